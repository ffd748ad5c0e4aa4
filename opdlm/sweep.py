"""Run config overlays over several seeds and tabulate them (Markdown and CSV).

    python sweep.py --name paper --seeds 0,1,2 --jobs 2 conf/ablations/method/*.yaml [key=value ...]

Each (overlay, seed) is one ``run.py`` run: the overlay on the config its ``base:`` names (on
conf/demo.yaml when it names none), then the overrides,
in ``runs/sweeps/<name>/<overlay>_s<seed>/``; the SFT stages are shared through
``run.stage_cache`` and computed once per seed, with the first overlay (and so its base config),
before the overlays run. The table has, per overlay: test accuracy after OPD (greedy and sampled,
mean ± std over seeds), the accuracy before OPD and the teacher's, the final OPD loss, the mean
gradient norm and its spread, and the response length.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from opdlm.config import DEFAULT_CONF
from opdlm.errors import ConfigError
from opdlm.layers import load_yaml


def _run(args: list[str], log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        return subprocess.call([sys.executable, "-m", "opdlm.cli", *args], stdout=fh, stderr=subprocess.STDOUT)


def _confs(overlay: str) -> list[str]:
    """The conf= words of an overlay's runs: the overlay alone when it names its base config (its
    chain applies), else conf/demo.yaml under it."""
    return [f"conf={overlay}"] if "base" in load_yaml(Path(overlay)) else [f"conf={DEFAULT_CONF}", f"conf={overlay}"]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _opd_log(run_dir: Path) -> tuple[float, list[float]]:
    """(last logged train/loss, every logged train/grad_norm) of a run's OPD stage."""
    path = run_dir / "logs" / "opd" / "metrics.csv"
    loss, norms = float("nan"), []
    if path.is_file():
        for row in csv.DictReader(path.open()):
            if row.get("train/loss"):
                loss = float(row["train/loss"])
            if row.get("train/grad_norm"):
                norms.append(float(row["train/grad_norm"]))
    return loss, norms


def summarise(out: Path, overlays: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    rows = []
    for ov in overlays:
        accs, saccs, before, teacher, losses, norms, lens, done = [], [], [], [], [], [], [], []
        for s in seeds:
            found = sorted((out / f"{Path(ov).stem}_s{s}").glob("*/results.json"))  # (the run's own run.name)
            if not found:
                continue
            run_dir = found[0].parent
            res = json.loads(found[0].read_text())
            after = res["student_after"]["test"]
            accs.append(100 * after.get("test/acc_greedy", float("nan")))
            saccs.append(100 * after.get("test/acc_sampled", float("nan")))
            before.append(100 * res["student_before"]["test"].get("test/acc_greedy", float("nan")))
            teacher.append(100 * (res.get("teacher") or {}).get("test", {}).get("test/acc_greedy", float("nan")))
            lens.append(after.get("test/len_greedy", float("nan")))
            loss, gn = _opd_log(run_dir)
            losses.append(loss)
            norms.extend(gn)
            done.append(s)
        (a, sa), (b, sb), (bf, sbf), (t, st) = _mean_std(accs), _mean_std(saccs), _mean_std(before), _mean_std(teacher)
        gm, gs = _mean_std(norms)
        rows.append({"overlay": Path(ov).stem, "seeds": len(done), "acc_greedy_mean": a, "acc_greedy_std": sa,
                     "acc_sampled_mean": b, "acc_sampled_std": sb, "acc_before_greedy": bf, "acc_before_greedy_std": sbf,
                     "teacher_acc_greedy": t, "teacher_acc_greedy_std": st,
                     "final_loss": _mean_std(losses)[0], "grad_norm_mean": gm, "grad_norm_std": gs,
                     "response_len": _mean_std(lens)[0]})
    return rows


def write_tables(out: Path, rows: list[dict[str, Any]], seeds: list[int]) -> str:
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| overlay | seeds | test acc greedy | test acc sampled | before OPD (greedy) | teacher (greedy) | final loss "
             "| grad norm | response length |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['overlay']} | {r['seeds']} | {r['acc_greedy_mean']:.1f} ± {r['acc_greedy_std']:.1f} % | "
                     f"{r['acc_sampled_mean']:.1f} ± {r['acc_sampled_std']:.1f} % | "
                     f"{r['acc_before_greedy']:.1f} ± {r['acc_before_greedy_std']:.1f} % | "
                     f"{r['teacher_acc_greedy']:.1f} ± {r['teacher_acc_greedy_std']:.1f} % | "
                     f"{r['final_loss']:.3f} | {r['grad_norm_mean']:.2f} ± {r['grad_norm_std']:.2f} | {r['response_len']:.1f} |")
    lines.append(f"\nseeds {', '.join(map(str, seeds))}; accuracy in %, mean ± std over seeds; grad norm: mean ± std over all logged steps")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sweep.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="sweep", help="sweep folder: runs/sweeps/<name>/")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets trainer.threads=1 when > 1)")
    ap.add_argument("--out-dir", default="runs/sweeps")
    ap.add_argument("items", nargs="+", help="overlay YAML files, then key=value overrides for every run")
    a = ap.parse_args(argv)
    overlays = [x for x in a.items if x.endswith((".yaml", ".yml"))]
    overrides = [x for x in a.items if "=" in x and not x.endswith((".yaml", ".yml"))]
    bad = [x for x in a.items if x not in overlays and x not in overrides]
    if bad or not overlays:
        ap.error(f"expected overlay .yaml files and key=value overrides, got {bad or 'no overlay'}")
    missing = [o for o in overlays if not Path(o).is_file()]
    if missing:
        ap.error(f"no such overlay file: {missing[0]}")
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    out = Path(a.out_dir) / a.name
    extra = [*overrides, f"run.stage_cache={out / 'cache'}", "trainer.progress_bar=false"]
    if a.jobs > 1:
        extra.append("trainer.threads=1")
    try:
        confs = {ov: _confs(ov) for ov in overlays}
    except ConfigError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    for ov in overlays:  # fail early: every run's config must compose and build
        rc = subprocess.call([sys.executable, "-m", "opdlm.cli", "--check", *confs[ov], *extra],
                             stdout=subprocess.DEVNULL)
        if rc:
            print(f"sweep: {ov} does not pass --check (see the error above)", file=sys.stderr)
            return 2
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        warm = [pool.submit(_run, [*confs[overlays[0]], *extra, f"run.seed={s}", "stages.opd.steps=0",
                                   "run.checkpoints=false",
                                   f"run.out_dir={out / '_sft'}", f"run.name=s{s}"], out / "_sft" / f"s{s}.log")
                for s in seeds]  # SFT stages once per seed, into the shared cache
        for f in warm:
            f.result()
        jobs = {(ov, s): pool.submit(_run, [*confs[ov], *extra, f"run.seed={s}",
                                            f"run.out_dir={out / f'{Path(ov).stem}_s{s}'}"],
                                     out / "logs" / f"{Path(ov).stem}_s{s}.log")
                for ov in overlays for s in seeds}
        failed = []
        for (ov, s), f in jobs.items():
            rc = f.result()
            print(f"sweep: {Path(ov).stem} seed {s}: {'ok' if rc == 0 else f'failed (rc {rc}), see the log'}", flush=True)
            if rc:
                failed.append((ov, s))
    rows = summarise(out, overlays, seeds)
    print(write_tables(out, rows, seeds))
    print(f"\nsweep folder: {out} (results.md, results.csv)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
