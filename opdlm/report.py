"""``opdlm report FOLDER``: pictures of a run folder or a sweep folder, written to FOLDER/report/.

A run folder gives curves.png (the OPD stage's training curves: loss, gradient norm, response
length, truncation, negative-reward fraction, teacher top-K mass, sampled tokens outside it, both
entropies, validation accuracy; episodes won, turns and invalid actions of multi-turn runs; one
line per task for a multi-task run's loss and validation accuracy), gap_by_position.png (the teacher − student log-prob gap of sampled
tokens per bucket of response positions over training: mean and 10th percentile) and tokens.html
(the saved rollouts, each token coloured by its gap, the teacher's top-K on hover). A sweep folder
(runs/sweeps/<name>/, one <overlay>_s<seed>/ run per overlay and seed) gives sweep.png: each
overlay's curve, the mean over seeds with a band from the lowest to the highest seed.

Matplotlib is an optional extra (pip install "opdlm[plots]"); without it the report says so in one
line, and tokens.html is still written.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

#: (metric, panel title) of the training curves, in panel order
CURVES = [
    ("train/loss", "loss"), ("train/grad_norm", "gradient norm"), ("train/response_len", "response length"),
    ("train/truncated_frac", "truncated fraction"), ("train/neg_reward_frac", "negative-reward fraction"),
    ("train/teacher_topk_mass", "teacher top-K mass"), ("train/sampled_outside_topk", "sampled outside top-K"),
    ("train/student_entropy", "student entropy"), ("train/teacher_entropy", "teacher entropy"),
    ("val/acc_greedy", "val accuracy (greedy)"), ("val/acc_sampled", "val accuracy (sampled)"),
    ("train/episode/won_frac", "episodes won"), ("train/episode/turns", "turns per episode"),
    ("train/episode/invalid_frac", "invalid actions"),
]


def per_task_panels(metrics: dict[str, list[tuple[int, float]]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """A multi-task run's panels with one line per task: (title, [(metric, task)])."""
    labels = sorted({k.split("/")[1] for k in metrics if re.fullmatch(r"train/[^/]+/loss", k)})
    panels = []
    for title, key in (("loss per task", "train/{}/loss"), ("val accuracy per task (greedy)", "val/{}/acc_greedy"),
                       ("val accuracy per task (sampled)", "val/{}/acc_sampled")):
        series = [(key.format(lab), lab) for lab in labels if key.format(lab) in metrics]
        if series:
            panels.append((title, series))
    return panels


class ReportError(Exception):
    """A folder the report cannot read; the message names it."""


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] from a Lightning metrics.csv (empty cells skipped); ReportError
    naming the file when it is not readable text in CSV form."""
    out: dict[str, list[tuple[int, float]]] = {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ReportError(f"'{path}' is not a readable metrics.csv ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for row in rows:
        try:
            step = int(float(row.get("step") or 0))
        except ValueError:
            raise ReportError(f"'{path}': a row's step is not a number ({row.get('step')!r})") from None
        for k, v in row.items():
            if k in ("epoch", "step") or v in ("", None) or not isinstance(v, str):
                continue  # (a cell past the header's columns comes as a list under the key None)
            try:
                x = float(v)
            except ValueError:
                continue
            if math.isfinite(x):
                out.setdefault(k, []).append((step, x))
    return out


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _grid(plt: Any, n: int) -> tuple[Any, list[Any]]:
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    flat = [a for r in axes for a in r]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def save(plt: Any, fig: Any, path: Path | str, legend: Any = None) -> Path:
    """Lay out, save (90 dpi) and close a figure; ``legend``: the axes that carries the legend."""
    if legend is not None:
        legend.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def curves_png(plt: Any, metrics: dict[str, list[tuple[int, float]]], out: Path, title: str) -> Path | None:
    panels = [(t, [(k, "")]) for k, t in CURVES if k in metrics] + per_task_panels(metrics)
    if not panels:
        return None
    fig, axes = _grid(plt, len(panels))
    for ax, (t, series) in zip(axes, panels):
        for k, label in series:
            xs, ys = zip(*metrics[k])
            ax.plot(xs, ys, lw=1.2, marker="o" if len(xs) < 12 else None, ms=3, label=label or None)
        if len(series) > 1:
            ax.legend(fontsize=7)
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save(plt, fig, out)


def _bucket_key(name: str) -> int:
    m = re.match(r"\d+", name)
    return int(m.group()) if m else 0


def gap_png(plt: Any, metrics: dict[str, list[tuple[int, float]]], out: Path) -> Path | None:
    buckets = sorted({k.split("/")[2] for k in metrics if k.startswith("train/gap_pos/")}, key=_bucket_key)
    if not buckets:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, stat, label in ((axes[0], "mean", "mean"), (axes[1], "p10", "10th percentile (lower tail)")):
        for b in buckets:
            series = metrics.get(f"train/gap_pos/{b}/{stat}")
            if series:
                xs, ys = zip(*series)
                ax.plot(xs, ys, lw=1.2, label=f"positions {b}")
        ax.set_title(f"teacher − student log-prob gap: {label}", fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.grid(alpha=0.3)
    return save(plt, fig, out, legend=axes[0])


def gap_colour(gap: float | None, scale: float = 3.0) -> str:
    """Background colour of a token: white at gap 0, red as the teacher likes it less (gap < 0),
    blue as it likes it more, saturating at |gap| = ``scale`` nats; grey where the teacher has no
    value for the same token."""
    if gap is None:
        return "#dddddd"
    a = min(1.0, abs(gap) / scale)
    c = round(255 * (1 - a))
    return f"#ff{c:02x}{c:02x}" if gap < 0 else f"#{c:02x}{c:02x}ff"


def tokens_html(rollout_dir: Path, out: Path, scale: float = 3.0) -> Path | None:
    files = sorted(rollout_dir.glob("step_*.jsonl")) if rollout_dir.is_dir() else []
    if not files:
        return None
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>opdlm rollouts</title><style>",
             "body{font-family:sans-serif;margin:1.5em} .r{margin:0.6em 0 1.4em} .p{color:#555;margin:0.2em 0}",
             ".t{font-family:monospace;white-space:pre-wrap;padding:1px 0;border-bottom:1px solid #bbb}",
             ".x{opacity:0.45}</style></head><body>",
             f"<h1>Rollouts by token</h1><p>Colour: teacher − student log-prob of each sampled token (red: the "
             f"teacher likes it less, blue: more, full at {scale:g} nats; grey: no teacher value for the same "
             f"token). Faded: not counted in the loss. Hover a token for its numbers and the teacher's top-K.</p>"]
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            parts.append(f"<div class='r'><h3>step {rec['step']}</h3><div class='p'>prompt: "
                         f"{html.escape(rec['prompt'])} (answer {html.escape(str(rec['answer']))})</div><div>")
            for tok in rec["tokens"]:
                gap = tok["gap"]
                tip = (f"teacher {tok['teacher']:.3f}, student {tok['student']:.3f}, gap {gap:.3f}"
                       if gap is not None else f"student {tok['student']:.3f}, no teacher value")
                if tok["topk"]:
                    tip += "\nteacher top-K: " + ", ".join(f"{t!r} {p:.3f}" for t, p in tok["topk"])
                cls = "t" if tok["counted"] else "t x"
                parts.append(f"<span class='{cls}' style='background:{gap_colour(gap, scale)}' "
                             f"data-gap='{'' if gap is None else repr(gap)}' title='{html.escape(tip, quote=True)}'>"
                             f"{html.escape(tok['text'])}</span>")
            parts.append("</div></div>")
    parts.append("</body></html>")
    out.write_text("".join(parts), encoding="utf-8")
    return out


def _runs_of_sweep(folder: Path) -> dict[str, list[Path]]:
    """overlay -> its run folders: <overlay>_s<seed>/ holds the run folder (sweep.py: <run.name>/
    inside it), or is one."""
    groups: dict[str, list[Path]] = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = re.fullmatch(r"(.+)_s\d+", d.name)
        runs = [r for r in (d, *sorted(d.iterdir())) if r.is_dir() and (r / "logs" / "opd" / "metrics.csv").is_file()]
        if m and runs:
            groups.setdefault(m.group(1), []).append(runs[0])
    return groups


def sweep_png(plt: Any, groups: dict[str, list[Path]], out: Path) -> Path | None:
    runs = {name: [read_metrics(d / "logs" / "opd" / "metrics.csv") for d in ds] for name, ds in groups.items()}
    panels = [(k, t) for k, t in CURVES if any(k in m for ms in runs.values() for m in ms)]
    if not panels:
        return None
    fig, axes = _grid(plt, len(panels))
    for ax, (k, t) in zip(axes, panels):
        for name, ms in runs.items():
            series = [dict(m[k]) for m in ms if k in m]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if not steps:
                continue
            vals = [[s[x] for s in series] for x in steps]
            mean = [sum(v) / len(v) for v in vals]
            line, = ax.plot(steps, mean, lw=1.2, label=f"{name} ({len(series)} seeds)")
            if len(series) > 1:
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2,
                                color=line.get_color())
        ax.set_title(t, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("overlays: mean over seeds, band from the lowest to the highest seed")
    return save(plt, fig, out, legend=axes[0])


def report(folder: str | Path) -> tuple[list[Path], str]:
    """Write the pictures of a run or sweep folder; returns (files written, a note for the user:
    '' or why some pictures are missing)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"'{folder}' is not a folder (give a run folder, runs/<name>, or a sweep folder)")
    out = folder / "report"
    plt = _pyplot()
    note = "" if plt is not None else 'matplotlib is not installed, so no PNG was drawn: pip install "opdlm[plots]"'
    written: list[Path] = []
    groups = _runs_of_sweep(folder)
    log = folder / "logs" / "opd" / "metrics.csv"
    if not groups and not log.is_file():
        raise ReportError(f"'{folder}' holds neither an OPD log (logs/opd/metrics.csv) nor sweep runs "
                          "(<overlay>_s<seed>/ folders)")
    out.mkdir(exist_ok=True)
    if log.is_file():
        metrics = read_metrics(log)
        if not metrics:
            said = (f"'{log}' holds no logged values yet (the OPD stage logs every trainer.log_every_n_steps "
                    f"optimizer steps), so there are no curves to draw")
            if not groups and not (folder / "rollouts" / "opd").is_dir():
                raise ReportError(said)
            note = "; ".join(x for x in (note, said) if x)
        if plt is not None:
            written += [p for p in (curves_png(plt, metrics, out / "curves.png", f"OPD: {folder.name}"),
                                    gap_png(plt, metrics, out / "gap_by_position.png")) if p]
        page = tokens_html(folder / "rollouts" / "opd", out / "tokens.html")
        written += [page] if page else []
    if groups and plt is not None:
        p = sweep_png(plt, groups, out / "sweep.png")
        written += [p] if p else []
    return written, note


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: opdlm report FOLDER   (a run folder runs/<name>, or a sweep folder runs/sweeps/<name>)",
              file=sys.stderr)
        return 2
    try:
        written, note = report(argv[0])
    except ReportError as e:
        print(f"opdlm: report: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    if note:
        print(f"opdlm: report: {note}", file=sys.stderr)
    return 0
