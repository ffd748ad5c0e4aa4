"""One whole OPD step, phase by phase, for several configurations on the same saved models and
prompts; with ``--trl``, TRL's DistillationTrainer and GKDTrainer on the same models and prompts.

The models: a random-weight Qwen2 student and teacher with the real Qwen tokenizer and 151,936
output rows (by default 40.9 M and 93.0 M parameters), built once and saved as Hugging Face
folders under ``--out``, so every configuration loads the same weights from disk. The prompts:
the first ``--prompts`` training prompts of the arithmetic task, rendered with the tokenizer's chat
template, one rollout each, ``--new-tokens`` sampled tokens (temperature 1, top-p 1).

Each measurement is a fresh process (the allocator's high-water mark belongs to it alone) that
loads the models, makes ``--warmup`` untimed steps and one timed step. The configurations are
interleaved over ``--rounds`` rounds (round 1: every configuration, then round 2, ...), so a slow
minute of the machine does not fall on one configuration; the table gives the median and the
range over rounds.

opdlm's phases are the engine's own calls: rollout (``OPDModule.sample``), teacher
(``OPDModule.prepare``: alignment, the teacher's pass, support, mask), student (``OPDModule.update``
without its optimizer step: the student's forward, head, loss and backward, and gradient clipping),
optimizer (the AdamW step and zeroing the gradients). Peak extra memory: the process's peak resident
memory during the timed step minus its resident memory just before it (Linux /proc). TRL's phases
are described in opdlm/bench/trl_step.py; its teacher's head runs inside its loss, so TRL's
teacher column holds only its body and its student column the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from opdlm.bench.head import _reset_peak, _rss_kb, last_line

#: the default configurations: (loss, head)
CONFIGS = ("reverse_kl:naive", "reverse_kl:lean", "lsm:naive", "lsm:lean")
TRL_CONFIGS = ("trl:distillation", "trl:gkd")
PHASES = ("step_s", "rollout_s", "teacher_s", "student_s", "optimizer_s", "peak_extra_mb")


def _model_overrides(args: Any) -> list[str]:
    out = []
    for role, hidden, layers, heads in (("student", args.student_hidden, args.student_layers, args.student_heads),
                                        ("teacher", args.teacher_hidden, args.teacher_layers, args.teacher_heads)):
        out += [f"{role}.hidden_size={hidden}", f"{role}.intermediate_size={4 * hidden}", f"{role}.layers={layers}",
                f"{role}.heads={heads}", f"{role}.kv_heads=2", f"{role}.tokenizer_path={args.qwen}",
                f"{role}.tiny_rows={args.rows}", f"{role}.max_positions={args.new_tokens + 128}",
                f"{role}.chat_template=true"]
    return out


def _common(args: Any) -> list[str]:
    return ["sampler.n=1", f"sampler.max_new_tokens={args.new_tokens}", "sampler.top_p=1.0", "sampler.temperature=1.0",
            f"stages.opd.prompts_per_step={args.prompts}", "trainer.progress_bar=false",
            f"stages.opd.student_head_block={args.chunk}",
            "task.n_train=2000", "task.n_val=10", "task.n_test=10"]


def prepare(args: Any) -> tuple[Path, dict[str, Any]]:
    """Build the two random-weight models once, save them (and the prompts) under ``--out``; reuse
    them when the folder was made with the same shapes. Returns the folder and its description."""
    from opdlm.builder import build_run
    from opdlm.config import compose
    from opdlm.discovery import discover
    from opdlm.paths import CONF_DIR
    discover()
    out = Path(args.out)
    shape = {"student": [args.student_hidden, args.student_layers, args.student_heads],
             "teacher": [args.teacher_hidden, args.teacher_layers, args.teacher_heads],
             "rows": args.rows, "prompts": args.prompts, "new_tokens": args.new_tokens, "qwen": str(args.qwen)}
    meta = out / "models.json"
    if meta.is_file() and json.loads(meta.read_text()).get("shape") == shape:
        return out, json.loads(meta.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    cfg = compose([str(CONF_DIR / "base.yaml")], [*_model_overrides(args), *_common(args)])
    built = build_run(cfg)
    desc: dict[str, Any] = {"shape": shape}
    for role, seed in (("student", 0), ("teacher", 1)):
        spec = built.student if role == "student" else built.teacher
        model = spec.build(seed)
        model.save_pretrained(out / role)
        spec.tokenizer.save_pretrained(out / role)
        desc[f"{role}_params"] = sum(p.numel() for p in model.parameters())
        del model
    prompts = [e.prompt for e in built.task.examples("train")[: args.prompts]]
    (out / "prompts.json").write_text(json.dumps(prompts))
    desc["prompts"] = prompts
    meta.write_text(json.dumps(desc))
    return out, desc


def case_config(args: Any, folder: Path, loss: str, head: str) -> dict[str, Any]:
    from opdlm.config import compose
    from opdlm.paths import CONF_DIR
    loss_over = ["loss.name=lsm", "support.name=teacher_topk", f"support.k={args.k}"] if loss == "lsm" else [
        f"loss.name={loss}"]
    return compose([str(CONF_DIR / "base.yaml")], [
        *_model_overrides(args), *_common(args), f"student.path={folder / 'student'}",
        f"teacher.path={folder / 'teacher'}", *loss_over, f"stages.opd.head={head}"])


def run_case(args: Any, folder: Path, loss: str, head: str) -> dict[str, Any]:
    """One process's measurement of one opdlm configuration (warm-up steps, then one timed step)."""
    from opdlm.builder import build_run
    from opdlm.discovery import discover
    from opdlm.module import OPDModule
    discover()
    torch.set_num_threads(args.threads)
    cfg = case_config(args, folder, loss, head)
    built = build_run(cfg)
    torch.manual_seed(0)
    module = OPDModule(cfg, built=built)
    examples = built.task.examples("train")[: args.prompts]
    assert [e.prompt for e in examples] == json.loads((folder / "prompts.json").read_text())
    opt = module.configure_optimizers()["optimizer"]
    step_opt = opt.step
    spent = [0.0]

    def timed_step(*a: Any, **kw: Any) -> Any:  # the optimizer phase: AdamW's step and zeroing the gradients
        t0 = time.perf_counter()
        r = step_opt(*a, **kw)
        opt.zero_grad(set_to_none=True)
        spent[0] += time.perf_counter() - t0
        return r

    opt.step = timed_step
    result: dict[str, Any] = {}
    for rep in range(args.warmup + 1):
        spent[0] = 0.0
        torch.manual_seed(100 + rep)
        base = _rss_kb("VmRSS")
        ok = _reset_peak()
        t0 = time.perf_counter()
        ro = module.sample(examples)
        t1 = time.perf_counter()
        view, teacher, support, mask = module.prepare(ro)
        t2 = time.perf_counter()
        module.update(ro, view, teacher, support, mask, optimizer=opt)
        t3 = time.perf_counter()
        peak = _rss_kb("VmHWM")
        del view, teacher, support, mask
        result = {"step_s": t3 - t0, "rollout_s": t1 - t0, "teacher_s": t2 - t1, "student_s": t3 - t2 - spent[0],
                  "optimizer_s": spent[0], "tokens": int(ro.response_mask.sum()),
                  "peak_extra_mb": (peak - base) / 1024 if ok else float("nan"),
                  "student_params": sum(p.numel() for p in module.student.parameters()),
                  "teacher_params": sum(p.numel() for p in module.teacher.parameters())}
    return result


def _spawn(cmd: list[str], threads: int) -> tuple[dict[str, Any] | None, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode or not lines:
        return None, last_line(res.stderr) or f"exit code {res.returncode}"
    return json.loads(lines[-1]), ""


def _command(args: Any, folder: Path, config: str) -> list[str]:
    kind, name = config.split(":")
    if kind == "trl":
        return [args.trl_python, str(Path(__file__).with_name("trl_step.py")), "--trainer", name,
                "--student", str(folder / "student"), "--teacher", str(folder / "teacher"),
                "--prompts", str(folder / "prompts.json"), "--new-tokens", str(args.new_tokens),
                "--warmup", str(args.warmup), "--steps", "1", "--threads", str(args.threads)]
    return [sys.executable, "-c", "import sys; from opdlm.bench.cli import main; sys.exit(main(sys.argv[1:]))",
            "step", "--case", config, *args.passthrough]


def _cell(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def run(args: Any) -> int:
    """Prepare the models, run every configuration ``--rounds`` times interleaved, print the table;
    1 (after one line saying why) when a configuration failed."""
    configs = list(args.configs) + (list(TRL_CONFIGS) if args.trl else [])
    if args.trl:
        probe = subprocess.run([args.trl_python, "-c", "import trl"], capture_output=True, text=True, check=False)
        if probe.returncode:
            print(f"bench.py step: --trl: TRL is not importable by {args.trl_python} (pip install trl==1.16.0 into "
                  f"that environment, or give --trl-python)", file=sys.stderr)
            return 2
    folder, desc = prepare(args)
    k = f", LSM on the teacher's top-{args.k}" if any(c.startswith("lsm:") for c in configs) else ""
    print(f"student {desc['student_params'] / 1e6:.1f} M parameters (H = {args.student_hidden}, "
          f"{args.student_layers} layers), teacher {desc['teacher_params'] / 1e6:.1f} M (H = {args.teacher_hidden}, "
          f"{args.teacher_layers} layers), {args.rows:,} output rows, the Qwen tokenizer; {args.prompts} chat prompts x "
          f"{args.new_tokens} new tokens, one rollout each; {args.threads} thread(s) per process; {args.rounds} "
          f"round(s) of one timed step after {args.warmup} warm-up step(s){k}; models in {folder}")
    got: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    failures: list[str] = []
    for r in range(args.rounds):
        for c in configs:
            res, why = _spawn(_command(args, folder, c), args.threads)
            if res is None:
                failures.append(f"{c}: {why}")
                print(f"round {r + 1}, {c}: failed: {why}", file=sys.stderr)
                continue
            got[c].append(res)
            print(f"round {r + 1}/{args.rounds}, {c}: step {res['step_s']:.2f} s", file=sys.stderr, flush=True)
    print()
    print("| configuration | step s | rollout s | teacher s | student s | optimizer s | peak extra MB | tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for c in configs:
        rows = got[c]
        if not rows:
            continue
        cells = [_cell([x[k] for x in rows], ",.0f" if k == "peak_extra_mb" else ".2f") for k in PHASES]
        print(f"| {label(c)} | {' | '.join(cells)} | {int(statistics.median(x['tokens'] for x in rows))} |")
    print("\n(median [min–max] over rounds)")
    ref = got.get("trl:distillation") or []
    if ref:
        t_ref = statistics.median(x["step_s"] for x in ref)
        m_ref = statistics.median(x["peak_extra_mb"] for x in ref)
        for c in configs:
            if got[c] and not c.startswith("trl:"):
                t = statistics.median(x["step_s"] for x in got[c])
                m = statistics.median(x["peak_extra_mb"] for x in got[c])
                print(f"{label(c)}: step time / TRL DistillationTrainer's {t / t_ref:.2f}x, peak extra memory "
                      f"{m / m_ref:.2f}x")
    if failures:
        print(f"bench.py step: {len(failures)} measurement(s) failed, the first: {failures[0]}", file=sys.stderr)
        return 1
    return 0


def label(config: str) -> str:
    kind, name = config.split(":")
    if kind == "trl":
        return {"distillation": "TRL DistillationTrainer (β = 1, chunked)", "gkd": "TRL GKDTrainer (β = 1)"}[name]
    return f"opdlm {kind}, {name} head"


def case_main(args: Any) -> int:
    loss, head = args.case.split(":")
    print(json.dumps(run_case(args, Path(args.out), loss, head)))
    return 0
