"""One on-policy distillation step of TRL's trainers, timed by phase, for comparison with opdlm's step.

Runs TRL 1.16.0's ``DistillationTrainer`` (chunked loss) or ``GKDTrainer`` (``trl.experimental.gkd``) through
``Trainer.train()`` for ``--warmup`` untimed and ``--steps`` timed optimizer steps on local Hugging Face model folders,
and prints one JSON line on stdout (everything else goes to stderr). It imports only the standard library, torch,
transformers, datasets and trl (never opdlm): it runs in its own environment where TRL is installed.

    python trl_step.py --trainer {distillation,gkd} --student DIR --teacher DIR --prompts FILE.json \
        --new-tokens 64 --warmup 1 --steps 1 --threads 1 [--chunk N]

FILE.json is a JSON list of strings, each one user message; the trainer applies the tokenizer's chat template with
the generation prompt. The batch is every prompt (one completion each), fully on-policy, beta = 1 (the reverse KL
KL(student || teacher) over the full vocabulary in both trainers), temperature 1, top-p 1, no top-k, exactly
``--new-tokens`` sampled tokens (``min_new_tokens`` = ``max_new_tokens``, so end-of-turn tokens cannot stop a row
early), fp32 on the CPU, AdamW as TRL configures it (``adamw_torch_fused``, weight decay 0, grad-norm clip 1.0),
lr 1e-5 constant, no gradient checkpointing (TRL turns it on by default; opdlm's step does not recompute), and no
logging, saving or evaluation.

Phases of one step (median over the timed steps), measured by wrapping at run time:
- ``step_s``: from the step's batch fetch (``Trainer.get_batch_samples``) to ``on_step_end`` (after ``zero_grad``);
- ``rollout_s``: the student's ``generate`` call (an instance attribute wrapping ``model.generate``);
- ``teacher_s``: the teacher's forward calls (forward pre-hook/hook on the teacher module). For GKD that is the
  whole teacher with its LM head over every position; for DistillationTrainer it is the teacher backbone only
  (``_get_last_hidden_state`` redirected through the teacher module): its LM head runs inside the chunked loss;
- ``teacher_head_in_loss_s`` (DistillationTrainer only): the teacher's LM-head tiles projected inside the chunked loss
  (``trl.kernels.chunked_divergence._project`` with the teacher's weight), in the forward and again in the backward;
  it physically runs in the student's loss, so it is part of ``student_s``, not ``teacher_s``;
- ``optimizer_s``: from ``on_pre_optimizer_step`` to ``on_step_end``: ``optimizer.step``, the (constant) scheduler
  step and ``model.zero_grad``;
- ``student_s``: the rest, ``step_s - rollout_s - teacher_s - optimizer_s``: the student's forward, the loss and its
  backward, plus the small bookkeeping around them (batch collation, prompt tokenization, gradient clipping).
``tokens`` counts the generated completion tokens (up to and including a first end token). ``peak_extra_mb`` is the
process's peak resident memory during the timed step minus its resident memory right before it (Linux: "5" written to
/proc/self/clear_refs resets VmHWM; VmRSS before, VmHWM after).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _parse(argv):
    p = argparse.ArgumentParser(description="Time one training step of TRL's on-policy distillation trainers.")
    p.add_argument("--trainer", choices=("distillation", "gkd"), required=True)
    p.add_argument("--student", required=True, help="student model folder (Hugging Face format, with tokenizer)")
    p.add_argument("--teacher", required=True, help="teacher model folder (same vocabulary)")
    p.add_argument("--prompts", required=True, help="JSON list of user messages")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=None,
                   help="DistillationTrainer: positions per tile of the chunked loss (TRL's default 4096)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        import trl
    except ImportError:
        print("trl_step: TRL is not installed (pip install trl==1.16.0)", file=sys.stderr)
        return 2
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(args.threads)
    with open(args.prompts) as f:
        prompts = json.load(f)
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        print("trl_step: --prompts must be a JSON list of strings", file=sys.stderr)
        return 2
    n_new = args.new_tokens
    tok = AutoTokenizer.from_pretrained(args.student, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    out_dir = tempfile.TemporaryDirectory(prefix="trl_step_")  # nothing is saved; removed at exit
    common = dict(
        output_dir=out_dir.name, per_device_train_batch_size=len(prompts),
        gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=1e-5,
        lr_scheduler_type="constant", bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, beta=1.0, temperature=1.0,
    )
    chunk_mod = None
    if args.trainer == "distillation":
        # beta = 1: ChunkedDivergenceFunction's mode 1, per completion token
        #   sum_v p_s(v) (log p_s(v) - log p_t(v)) = KL(student || teacher) over the full vocabulary,
        # summed over the completion tokens and divided by their number (num_items_in_batch).
        # The chunked loss is the only loss path of DistillationTrainer (no config switch): both LM heads are
        # projected on [TOKEN_CHUNK_SIZE, VOCAB_CHUNK_SIZE] tiles (module constants 4096 x 32768), so --chunk sets
        # trl.kernels.chunked_divergence.TOKEN_CHUNK_SIZE. The trainer is always on-policy (it has no lmbda).
        import trl.kernels.chunked_divergence as chunk_mod
        from trl import DistillationConfig, DistillationTrainer

        if args.chunk:
            chunk_mod.TOKEN_CHUNK_SIZE = args.chunk
        cfg = DistillationConfig(**common, max_completion_length=n_new, top_p=1.0, top_k=0,
                                 generation_kwargs={"min_new_tokens": n_new})
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=data,
                                      processing_class=tok)
    else:
        # beta = 1: generalized_jsd_loss takes F.kl_div(teacher_log_probs, student_log_probs, log_target=True),
        #   sum_v p_s(v) (log p_s(v) - log p_t(v)) = KL(student || teacher) over the full vocabulary,
        # from full [B, L, V] logits of both models, masked to the completion tokens, summed and divided by
        # num_items_in_batch. lmbda = 1: `random.random() <= lmbda` always samples from the student.
        # The dataset needs "messages" ending with an assistant turn (DataCollatorForChatML takes messages[:-1] as
        # the prompt); the empty reply is replaced by the student's completion.
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        cfg = GKDConfig(**common, lmbda=1.0, max_new_tokens=n_new)
        data = Dataset.from_list([{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ""}]}
                                  for p in prompts])
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=data,
                             processing_class=tok)
        trainer.generation_config.min_new_tokens = n_new  # GKDConfig has no generation_kwargs; top_k=0, top_p=1 fixed

    cur: dict[str, float] = {}
    records: list[dict[str, float]] = []

    def add(key, seconds):
        cur[key] = cur.get(key, 0.0) + seconds

    # Rollout: the student's generate (both trainers call `unwrapped_model.generate`, the same object on one CPU).
    model = trainer.accelerator.unwrap_model(trainer.model)
    generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        add("rollout_s", time.perf_counter() - t0)
        seqs = out.sequences if hasattr(out, "sequences") else out
        comp = seqs[:, kw["input_ids"].shape[1]:]
        eos = kw["generation_config"].eos_token_id
        if eos is None:
            add("tokens", comp.numel())
        else:
            is_eos = torch.isin(comp, torch.tensor(eos if isinstance(eos, list) else [eos]))
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, comp.shape[1])
            add("tokens", int(first.sum()))
        return out

    model.generate = timed_generate

    # Teacher: every call of the teacher module (GKD: teacher(...); DistillationTrainer: _forward_redirection
    # calls the teacher module with its forward redirected to _get_last_hidden_state, the backbone only).
    t_teacher = [0.0]
    trainer.teacher_model.register_forward_pre_hook(lambda m, a: t_teacher.__setitem__(0, time.perf_counter()))
    trainer.teacher_model.register_forward_hook(
        lambda m, a, o: add("teacher_s", time.perf_counter() - t_teacher[0]))

    if chunk_mod is not None:  # the teacher's LM-head tiles inside the chunked loss (forward and backward)
        teacher_head = trainer.accelerator.unwrap_model(trainer.teacher_model).get_output_embeddings().weight
        project = chunk_mod._project

        def timed_project(tile, hidden_chunk, weight, *rest):
            if weight is not teacher_head:
                return project(tile, hidden_chunk, weight, *rest)
            t0 = time.perf_counter()
            out = project(tile, hidden_chunk, weight, *rest)
            add("teacher_head_in_loss_s", time.perf_counter() - t0)
            return out

        chunk_mod._project = timed_project

    # Step boundaries: the batch fetch starts a step; the callback marks the optimizer and the step's end.
    get_batch_samples = trainer.get_batch_samples

    def timed_get_batch_samples(*a, **kw):
        cur.clear()
        gc.collect()
        _reset_peak()
        cur["rss0_kb"] = _status_kb("VmRSS")
        cur["t0"] = time.perf_counter()
        return get_batch_samples(*a, **kw)

    trainer.get_batch_samples = timed_get_batch_samples

    class StepTimer(TrainerCallback):
        def on_pre_optimizer_step(self, *a, **kw):
            cur["opt0"] = time.perf_counter()

        def on_step_end(self, *a, **kw):
            now = time.perf_counter()
            rec = dict(cur, step_s=now - cur["t0"], optimizer_s=now - cur["opt0"],
                       peak_extra_mb=(_status_kb("VmHWM") - cur["rss0_kb"]) / 1024)
            rec["student_s"] = rec["step_s"] - sum(rec.get(k, 0.0) for k in ("rollout_s", "teacher_s", "optimizer_s"))
            records.append(rec)

    trainer.add_callback(StepTimer())
    with contextlib.redirect_stdout(sys.stderr):  # Trainer's printer callback writes to stdout
        trainer.train()

    timed = records[args.warmup:]
    keys = ["step_s", "rollout_s", "teacher_s", "student_s", "optimizer_s", "tokens", "peak_extra_mb"]
    if chunk_mod is not None:
        keys.insert(5, "teacher_head_in_loss_s")
    result = {k: round(statistics.median(r.get(k, 0.0) for r in timed), 4) for k in keys}
    result["tokens"] = int(result["tokens"])
    optim = getattr(cfg.optim, "value", cfg.optim)
    common_note = (f"beta=1: reverse KL(student||teacher) over the full vocabulary; optimizer {optim} "
                   f"(lr 1e-5 constant, clip {cfg.max_grad_norm}, weight decay {cfg.weight_decay}); fp32 CPU; "
                   "no gradient checkpointing; min_new_tokens=max_new_tokens")
    if chunk_mod is not None:
        note = (f"DistillationTrainer: chunked loss is TRL's only path (ChunkedDivergenceFunction, torch tiles of "
                f"{chunk_mod.TOKEN_CHUNK_SIZE} positions x {chunk_mod.VOCAB_CHUNK_SIZE} vocab rows; --chunk sets "
                "TOKEN_CHUNK_SIZE); teacher_s is the teacher backbone, its LM head runs inside the loss (forward and "
                "backward) and is counted in student_s (teacher_head_in_loss_s); always on-policy")
    else:
        note = ("GKDTrainer (trl.experimental.gkd): lmbda=1, full [B,L,V] logits of both models (teacher_s includes "
                "its LM head over every position); no chunked option (--chunk ignored); the loss is divided by the "
                "label count of the dataset's (empty) assistant reply, not by the generated tokens")
    result.update(trainer=args.trainer, trl_version=trl.__version__, notes=f"{note}; {common_note}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
