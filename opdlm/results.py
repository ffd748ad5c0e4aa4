"""The results of a run as people read them: the results table (one block per task for a run of
several), and the difference between a run folder's saved config and a new one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def config_diff(saved: Path, cfg: dict[str, Any], most: int = 3) -> str:
    """' (differs in a.b: x -> y, ...)' between a saved config.yaml and ``cfg``."""
    try:
        old = yaml.safe_load(saved.read_text())
    except Exception:
        return ""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix[:-1]: d}
    a, b = flat(old), flat(cfg)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not keys:
        return ""
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:most])
    return f" (differs in {shown}{', ...' if len(keys) > most else ''})"


def results_table(results: dict[str, Any], cfg: dict[str, Any]) -> str:
    if cfg.get("tasks"):  # one table per task (each teacher on its own task), then the mean over tasks
        keys = ("teacher", "student_before", "student_after")
        blocks = []
        for entry in cfg["tasks"]:
            label = entry["label"]
            own = {key: {"test": {f"test/{k[len(f'test/{label}/'):]}": v for k, v in results[key]["test"].items()
                                  if k.startswith(f"test/{label}/")}} for key in keys}
            table = results_table({**own, "seed": results["seed"], "seconds": results["seconds"]},
                                  {**cfg, "tasks": [], "eval": cfg["eval"]})
            blocks.append(f"task {label} ({entry['name']}):\n\n" + table.rsplit("\n\nseed ", 1)[0])
        m0 = "greedy" if cfg["eval"]["greedy"] else "sampled"
        rows = ["| model | " + " | ".join(e["label"] for e in cfg["tasks"]) + " | mean |", "|---" * (2 + len(cfg["tasks"])) + "|"]
        names = {"teacher": "teachers (each on its task)", "student_before": "student before OPD",
                 "student_after": "student after OPD"}
        for key, name in names.items():
            t = results[key]["test"]
            cells = [f"{100 * t.get('test/' + e['label'] + '/acc_' + m0, float('nan')):.1f} %" for e in cfg["tasks"]]
            rows.append(f"| {name} | " + " | ".join(cells) + f" | {100 * t.get(f'test/acc_{m0}', float('nan')):.1f} % |")
        procs = results.get("processes", 1)
        wall = results.get("wall_seconds", results["seconds"])
        tail = (f"\nseed {results['seed']}, {cfg['eval']['test_prompts']} test prompts per task, {results['seconds']:.1f} s "
                f"of compute" + (f" ({wall:.1f} s in this command, the rest cached)" if wall < results["seconds"] - 1 else "")
                + (f", {procs} processes" if procs > 1 else ""))
        return "\n\n".join(blocks) + f"\n\nall tasks (test acc / success, {m0}):\n\n" + "\n".join(rows) + "\n" + tail
    ev = cfg["eval"]
    modes = [m for m in ("greedy", "sampled") if ev[m]]
    m0 = modes[0] if modes else "greedy"
    n = ev["samples"]["test"]
    cols = [(f"test acc ({m}{', avg@' + str(n) if m == 'sampled' and n > 1 else ''})", f"test/acc_{m}", True)
            for m in modes]
    cols += [(name, f"test/{name}", True) for k in ev["pass_k"]["test"] for name in (f"pass@{k}", f"maj@{k}")]
    cols += [("unparsed", f"test/unparsed_{m0}", True), ("mean length", f"test/len_{m0}", False),
             ("truncated", f"test/trunc_{m0}", True), ("mean turns", f"test/turns_{m0}", False),
             ("invalid actions", f"test/invalid_{m0}", True)]
    names = {"teacher": "teacher", "student_before": "student before OPD", "student_after": "student after OPD"}
    tests = {key: results[key]["test"] for key in names}
    if any(f"test/turns_{m0}" in t for t in tests.values()):  # played episodes: accuracy is the success rate
        cols = [(c[0].replace("test acc", "success"), *c[1:]) for c in cols]
    cols = [c for c in cols if any(c[1] in t for t in tests.values())]  # maj@k, unparsed: tasks that extract

    def cell(t: dict[str, float], key: str, pct: bool) -> str:
        if key not in t:  # (a served teacher is not evaluated)
            return "—"
        v = t[key]
        return f"{100 * v:.1f} %" if pct else f"{v:.1f}"

    rows = ["| model | " + " | ".join(c[0] for c in cols) + " |", "|---" * (1 + len(cols)) + "|"]
    rows += [f"| {label} | " + " | ".join(cell(tests[key], k, pct) for _, k, pct in cols) + " |"
             for key, label in names.items()]
    benches = sorted({k.split("/")[1] for t in tests.values() for k in t if k.count("/") == 2})
    if benches:  # one column per benchmark (the first mode's accuracy); the table above averages them
        rows += ["", f"per benchmark (test acc, {m0}):", "",
                 "| model | " + " | ".join(benches) + " | mean |", "|---" * (2 + len(benches)) + "|"]
        rows += [f"| {label} | " + " | ".join(cell(tests[key], f"test/{b}/acc_{m0}", True) for b in benches)
                 + f" | {cell(tests[key], f'test/acc_{m0}', True)} |" for key, label in names.items()]
    n = cfg["eval"]["test_prompts"]
    procs = results.get("processes", 1)
    wall = results.get("wall_seconds", results["seconds"])
    rows.append(f"\nseed {results['seed']}, {n} test prompts, {results['seconds']:.1f} s of compute"
                + (f" ({wall:.1f} s in this command, the rest cached)" if wall < results["seconds"] - 1 else "")
                + (f", {procs} processes" if procs > 1 else ""))
    return "\n".join(rows)
