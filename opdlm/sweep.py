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
import contextlib
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from opdlm.config import DEFAULT_CONF
from opdlm.errors import ConfigError
from opdlm.layers import load_yaml

#: the runs in progress (ended with the sweep: _stop_children)
_CHILDREN: set[subprocess.Popen] = set()
_LOCK = threading.Lock()
_STOPPING = threading.Event()


def _run(args: list[str], log: Path) -> int:
    """One run.py run, its output in ``log``; it ends with the sweep (see _stop_children and the
    OPDLM_PARENT_PID watch in opdlm.cli)."""
    if _STOPPING.is_set():
        return 143
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OPDLM_PARENT_PID": str(os.getpid())}
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "opdlm.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=env)
        with _LOCK:
            _CHILDREN.add(proc)
        try:
            return proc.wait()
        finally:
            with _LOCK:
                _CHILDREN.discard(proc)


def _stop_children(signum: int, frame: Any) -> None:
    """SIGTERM or Ctrl-C to the sweep: each run in progress gets SIGTERM (it stops as run.py does,
    keeping its checkpoint), and the sweep waits for them before it exits."""
    _STOPPING.set()
    with _LOCK:
        live = list(_CHILDREN)
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    for p in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=120)
    raise SweepStopped(signum)


class SweepStopped(Exception):
    """The sweep was told to stop (its runs have been stopped)."""


def parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds``: comma-separated integers >= 0, each once; ValueError naming the problem."""
    seeds = []
    for part in text.split(","):
        p = part.strip()
        if not p.isdigit():
            raise ValueError(f"--seeds: expected comma-separated integers >= 0 (e.g. 0,1,2), got {text!r}")
        if int(p) in seeds:
            raise ValueError(f"--seeds: seed {int(p)} is given twice in {text!r} (its runs would share a folder)")
        seeds.append(int(p))
    return seeds


def _confs(overlay: str) -> list[str]:
    """The conf= words of an overlay's runs: the overlay alone when it names its base config (its
    chain applies), else conf/demo.yaml under it."""
    return [f"conf={overlay}"] if "base" in load_yaml(Path(overlay)) else [f"conf={DEFAULT_CONF}", f"conf={overlay}"]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and standard deviation of the finite values (NaN, NaN when there are none; std 0 for one)."""
    xs = [x for x in xs if math.isfinite(x)]
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
    try:
        seeds = parse_seeds(a.seeds)
    except ValueError as e:
        ap.error(str(e))
    if a.jobs < 1:
        ap.error(f"--jobs: must be at least 1, got {a.jobs}")
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
    main_thread = threading.current_thread() is threading.main_thread()
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    for sig in before:
        signal.signal(sig, _stop_children)
    _STOPPING.clear()
    try:
        failed = _sweep(out, overlays, seeds, confs, extra, a.jobs)
    except SweepStopped as e:
        code = 143 if e.args[0] == signal.SIGTERM else 130
        print(f"sweep: stopped ({signal.Signals(e.args[0]).name}); the runs in progress were stopped and keep their "
              f"checkpoints: the same command continues them", file=sys.stderr)
        return code
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    rows = summarise(out, overlays, seeds)
    print(write_tables(out, rows, seeds))
    print(f"\nsweep folder: {out} (results.md, results.csv)")
    return 1 if failed else 0


def _sweep(out: Path, overlays: list[str], seeds: list[int], confs: dict[str, list[str]], extra: list[str],
           jobs: int) -> list[tuple[str, int]]:
    """The SFT stages once per seed, then every (overlay, seed); the failed ones."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
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
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
