"""One OPD step with the naive and the lean student head, timed by phase, with the peak extra
memory of the loss path, and the teacher's scoring against one plain forward of the teacher.

Each case runs in a fresh process (so the allocator's high-water mark belongs to that case alone):
a real OPD step of the engine on a 1-layer Qwen2 student and teacher with hidden size H and V
output rows (the real Qwen tokenizer, rows padded to 151,936 as in Qwen models), the configured
loss (LSM on the teacher's top-K by default; ``--loss reverse_kl`` for a full-vocabulary one).
Phases:
- rollout: top-p sampling with the KV cache;
- teacher: alignment, the teacher's forward and its one head pass (top-K, log-sum-exp, entropy,
  support logits), mask; next to it, the yardstick: one plain forward of the teacher's body over
  the sequence and of its head over the scored positions. A full-vocabulary loss on the lean head
  runs the teacher's head inside the loss's pass instead (one blocked pass, in the student column);
- student: the loss path, from the student's forward to the end of its backward (body and head),
  with the loss plugin's own time reported apart;
- student no-grad: the student's scoring without gradients (old log-probs, its own top-K), next
  to one plain forward of the student (body, and head over the scored positions).
Peak extra memory of the loss path: the process's peak during the student's head, loss and
backward, minus its memory just before (Linux /proc high-water mark, or CUDA's allocator). The
parameters' gradients start as None, as in training (the engine zeroes them with set_to_none), so
both paths allocate the gradients (the head's [V, H] one among them) inside the measured path; the
table gives their size, and the summary also compares the two paths without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from opdlm.builder import build_run
from opdlm.config import compose
from opdlm.discovery import discover
from opdlm.models import render_prompt
from opdlm.module import OPDModule
from opdlm.ops.head import gather_columns, split_model
from opdlm.paths import CONF_DIR
from opdlm.scoring import response_columns


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _config(mode: str, tokens: int, args: Any) -> dict[str, Any]:

    head_mode = "naive" if mode == "compare" else mode
    if args.conf:
        return compose([args.conf], [f"stages.opd.head={head_mode}", "trainer.progress_bar=false",
                                     f"stages.opd.optimizer_impl={args.optimizer_impl}", *args.overrides])
    if args.demo:
        over = [f"stages.opd.head={head_mode}", "trainer.progress_bar=false", f"stages.opd.optimizer_impl={args.optimizer_impl}"]
        return compose([str(CONF_DIR / "demo.yaml")], over)
    B = max(1, tokens // args.seq)
    # positions for the longest prompt of the task (under 64 tokens) and the whole response
    model = [f"hidden_size={args.hidden}", f"intermediate_size={2 * args.hidden}", "layers=1",
             "heads=8", f"tokenizer_path={args.qwen}", f"tiny_rows={args.rows}", f"max_positions={args.seq + 64}"]
    over = [*(f"{r}.{m}" for r in ("teacher", "student") for m in model),
            f"support.k={args.k}", "sampler.n=1", f"sampler.max_new_tokens={args.seq}",
            f"stages.opd.prompts_per_step={B}", f"stages.opd.head={head_mode}", f"loss.name={args.loss}",
            f"stages.opd.student_head_block={args.chunk}", f"stages.opd.teacher_head_block={args.teacher_chunk}",
            "task.n_train=2000", "task.n_val=10", "task.n_test=10", f"stages.opd.optimizer_impl={args.optimizer_impl}"]
    return compose([str(CONF_DIR / "base.yaml")], over)


def run_case(mode: str, tokens: int, args: Any) -> dict[str, Any]:


    discover()
    torch.manual_seed(0)
    cfg = _config(mode, tokens, args)
    built = build_run(cfg)
    module = OPDModule(cfg, built=built)
    cuda = args.device == "cuda"
    if cuda:
        module.to("cuda")
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=args.bf16)
    tok = built.student.tokenizer
    n = cfg["stages"]["opd"]["prompts_per_step"]
    ex = built.task.examples("train")[:n]
    prompts = [render_prompt(tok, e.prompt, bool(cfg["student"]["chat_template"])) for e in ex]
    out: dict[str, Any] = {"mode": mode, "rows": built.student.vocab_rows, "hidden": cfg["student"]["hidden_size"],
                           "full_vocabulary": built.loss.reads.vocabulary == "full",
                           "teacher_head_in_loss": module.scorer().full_vocab_path(module.student, module.teacher) == "loss"}
    loss_time = [0.0]
    compute = built.loss.compute

    def timed(inputs):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        r = compute(inputs)
        loss_time[0] += time.perf_counter() - t0
        return r

    built.loss.compute = timed
    if mode == "compare":  # the two paths on one rollout: relative gradient difference
        with torch.no_grad(), autocast:
            ro = built.sampler.sample(module.student, tok, prompts, ex)
        with autocast:
            view, teacher, support, mask = module.prepare(ro)
        grads = {}
        for head in ("naive", "lean"):
            module.stage["head"] = head
            with autocast:
                view, teacher, support, mask = module.prepare(ro)
            module.student.zero_grad(set_to_none=True)
            with autocast:
                module.loss_backward(ro, support, teacher, None, mask, view, mask.sum().float())
            grads[head] = torch.cat([p.grad.flatten().float() for p in module.student.parameters() if p.grad is not None])
        d = (grads["lean"] - grads["naive"]).abs().max() / grads["naive"].abs().max()
        return {"mode": mode, "positions": int(ro.targets.numel()), "max_rel_grad_diff": float(d)}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mem: dict[str, float] = {}

    def hook(name: str) -> None:
        sync()
        if name == "loss_path_start":
            mem["t"] = time.perf_counter()
            if cuda:
                mem["base"] = torch.cuda.memory_allocated() / 1024
                torch.cuda.reset_peak_memory_stats()
                mem["ok"] = 1
            else:
                mem["base"] = _rss_kb("VmRSS")
                mem["ok"] = float(_reset_peak())
        else:
            mem["path_s"] = time.perf_counter() - mem["t"]
            mem["peak"] = (torch.cuda.max_memory_allocated() / 1024 if cuda
                           else (_rss_kb("VmHWM") if mem["ok"] else 0))

    plain = bool(args.conf) or (not args.demo and tokens <= args.naive_max)  # plain forwards hold [B, L, V] logits
    opt = module.configure_optimizers()["optimizer"]  # the stage's AdamW (stages.opd.optimizer_impl)
    for rep in range(args.repeats + args.warmup):  # warm-up steps first
        loss_time[0] = 0.0
        mem.clear()
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            ro = built.sampler.sample(module.student, tok, prompts, ex)
        sync()
        t1 = time.perf_counter()
        with autocast:
            view, teacher, support, mask = module.prepare(ro)
        sync()
        t2 = time.perf_counter()
        module.student.zero_grad(set_to_none=True)
        with autocast:
            feats, head = module.student_features(ro)  # the student's body; then the measured loss path
            hook("loss_path_start")
            module.head_loss_backward(feats, head, ro, support, teacher, None, mask, view, mask.sum().float())
            del feats, head
            hook("loss_path_end")
        sync()
        t3 = time.perf_counter()
        grad_mb = sum(p.grad.numel() * p.grad.element_size() for p in module.student.parameters()
                      if p.grad is not None) / 2**20
        s0 = time.perf_counter()
        opt.step()  # the optimizer phase: one AdamW step over the student's parameters
        sync()
        opt_s = time.perf_counter() - s0
        del view, teacher, support
        with torch.no_grad(), autocast:
            module.score_student(ro, None, topk=min(args.k, built.student.n_ids))
        sync()
        t4 = time.perf_counter()
        tp = sp = spb = float("nan")
        if plain:
            with torch.no_grad(), autocast:
                v = module.align(ro, built.only)
                s0 = time.perf_counter()
                plain_forward(module.teacher, v.input_ids, v.attention_mask, v.position_ids, v.pred_columns)
                sync()
                tp = time.perf_counter() - s0
                s0 = time.perf_counter()
                plain_forward(module.student, ro.input_ids, ro.attention_mask, ro.position_ids, response_columns(ro))
                sync()
                sp = time.perf_counter() - s0
            s0 = time.perf_counter()  # the floor of the student's phase: a plain forward + backward of the same tokens
            with autocast:
                module.student(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=ro.position_ids,
                               use_cache=False).logits.float().logsumexp(-1).mean().backward()
            sync()
            spb = time.perf_counter() - s0
            module.student.zero_grad(set_to_none=True)
        base, peak, ok = mem["base"], mem["peak"], bool(mem["ok"])
        if rep < args.warmup:
            continue
        step = {
            "tokens": int(ro.response_mask.sum()), "positions": int(ro.targets.numel()),
            "rollout_s": t1 - t0, "teacher_s": t2 - t1, "teacher_plain_s": tp,
            "student_s": t3 - t2 - loss_time[0], "loss_s": loss_time[0],
            "student_nograd_s": t4 - t3, "student_plain_s": sp, "student_plain_fb_s": spb,
            "peak_extra_mb": (peak - base) / 1024 if ok else float("nan"), "path_s": mem["path_s"],
            "grad_mb": grad_mb, "optimizer_s": opt_s,
        }
        for k, v in step.items():
            out.setdefault(k, []).append(v)
    return {k: (min(v) if isinstance(v, list) and k.endswith("_s") else (max(v) if isinstance(v, list) else v))
            for k, v in out.items()}


def plain_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor, columns: torch.Tensor) -> float:
    """The yardstick of a scoring pass: one plain forward of the body over the sequence and of the
    head over the scored columns only (the whole logits when the head cannot be split off)."""
    split = split_model(model)
    if split is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).logits.sum().item()
    body, lm_head = split
    h = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
             use_cache=False).last_hidden_state
    return lm_head(gather_columns(h, columns)).sum().item()


def _case(args: Any, spec: str, failures: list[str]) -> dict[str, Any] | None:
    cmd = [sys.executable, "-c", "import sys; from opdlm.bench.cli import main; sys.exit(main(sys.argv[1:]))",
           "head", "--case", spec, *args.passthrough]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode or not line:
        print(f"case {spec}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
        failures.append(f"case {spec}: {last_line(res.stderr) or f'exit code {res.returncode}'}")
        return None
    return json.loads(line[-1])


def last_line(text: str) -> str:
    """The last non-empty line of a process's output (what a failed case said last)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[-1] if lines else ""


def run(args: Any) -> int:
    """Spawn one process per case and print the table; 1 (after one line saying why) when a case failed."""
    failures: list[str] = []
    cases = [(m, t) for t in args.tokens for m in ("naive", "lean") if not (m == "naive" and t > args.naive_max)]
    if args.conf:  # one step of the config's own models, each head
        cases, args.with_demo = [("naive", -1), ("lean", -1)], False
    shape = (f"config {args.conf} {' '.join(args.overrides)}".rstrip() if args.conf else
             f"loss {args.loss}; V = {args.rows:,} rows, H = {args.hidden}, K = {args.k}, sequence length {args.seq}, "
             f"student head blocks of {args.chunk} positions, no-grad head passes (teacher, student scoring) of "
             f"{args.teacher_chunk}")
    print(f"device {args.device}{' bf16 autocast' if args.bf16 else ' fp32'}; {shape}, {args.repeats} timed step(s) "
          f"after {args.warmup} warm-up step(s) (best kept), torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    if args.compare:
        r = _case(args, f"compare:{args.tokens[0]}", failures)
        if r:
            print(f"lean vs naive on one rollout, B·T = {r['positions']:,}: max |g_lean - g_naive| / max |g_naive| "
                  f"= {r['max_rel_grad_diff']:.2e}")
    rows = []
    for mode, tokens in cases + ([("naive", 0), ("lean", 0)] if args.with_demo else []):
        r = _case(args, f"{mode}:{tokens}", failures)
        if r:
            r["label"] = ("demo models" if tokens == 0 else Path(args.conf).stem if tokens < 0
                          else f"B·T = {r['positions']:,}")
            rows.append(r)
    print()
    print("| case | head | rollout s | teacher s | teacher plain forward s | student fwd+bwd s | loss s | "
          "peak extra memory of the loss path | of which the parameters' gradients | student no-grad scoring s | "
          "student plain forward s | student plain fwd+bwd s | optimizer s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['mode']} | {r['rollout_s']:.2f} | {r['teacher_s']:.2f} | {r['teacher_plain_s']:.2f} | "
              f"{r['student_s']:.2f} | {r['loss_s']:.3f} | {r['peak_extra_mb']:,.0f} MB | {r['grad_mb']:,.0f} MB | "
              f"{r['student_nograd_s']:.2f} | {r['student_plain_s']:.2f} | {r['student_plain_fb_s']:.2f} | "
              f"{r['optimizer_s']:.3f} |")
    print()
    by = {(r["mode"], r["label"]): r for r in rows}
    full = bool(rows) and rows[0].get("full_vocabulary", False)
    loss_name = Path(args.conf).stem if args.conf else args.loss
    for r in rows:
        if r["teacher_plain_s"] == r["teacher_plain_s"]:  # not NaN
            where = (" (its head runs in the student's phase, one blocked pass inside the loss)"
                     if r.get("teacher_head_in_loss") else "")
            print(f"{r['label']} {r['mode']}, {loss_name}: teacher scoring / one plain teacher forward (body, and head "
                  f"over the scored positions) {r['teacher_s'] / r['teacher_plain_s']:.2f}x (target <= 1.1x){where}; "
                  f"student no-grad scoring / one plain student forward "
                  f"{r['student_nograd_s'] / r['student_plain_s']:.2f}x (target <= 1.1x)")
        if r["mode"] != "lean" or ("naive", r["label"]) not in by:
            continue
        nv = by[("naive", r["label"])]
        t_lean = r["student_s"] + r["loss_s"]
        t_naive = nv["student_s"] + nv["loss_s"]
        own = (r["peak_extra_mb"] - r["grad_mb"]) / (nv["peak_extra_mb"] - nv["grad_mb"])
        both = r["student_s"] + r["loss_s"] + r["teacher_s"], nv["student_s"] + nv["loss_s"] + nv["teacher_s"]
        print(f"{r['label']}: lean / naive peak memory of the loss path {r['peak_extra_mb'] / nv['peak_extra_mb']:.3f}, "
              f"without the gradients both allocate {own:.3f} (target <= 0.125); time lean / naive: student "
              f"forward+backward+loss {t_lean / t_naive:.2f}x (target <= {'0.9' if full else '1.15'}x), teacher and "
              f"student phases together {both[0] / both[1]:.2f}x")
    if failures:
        print(f"bench.py head: {len(failures)} case(s) failed, the first: {failures[0]}", file=sys.stderr)
        return 1
    return 0
