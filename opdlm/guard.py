"""Non-finite numbers never reach the weights.

Every optimizer step of every stage goes through ``guarded_step``: the gradient is clipped (its
norm over every rank's shard), then the step's losses and the gradient norm are checked, on every
rank alike (one all-reduce of their finiteness flags, so no rank steps while another stops). A
non-finite value never updates the weights:

- ``stages.<stage>.nonfinite: stop`` (the default) writes a checkpoint of the weights as they were
  before the step (``checkpoints/<stage>/last.ckpt``, when ``run.checkpoints`` is on) and stops with
  one line: the stage, the step, what was not finite (a ``weighted_sum`` term by its key, the loss,
  or the gradient) and how to continue;
- ``skip`` drops that step's update (the optimizer sees no gradient: no moment, no weight decay,
  no update), counts it in the step log (``train/skipped_steps``), and stops after
  ``nonfinite_skips`` skipped steps in a row.

Weights are also checked where they are written or read: a checkpoint (``on_save_checkpoint``), a
stage folder (before it is saved), a model or stage folder (after it is loaded, and every
safetensors file at ``--check``) and a checkpoint to resume from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from opdlm import dist
from opdlm.optim import OPTIMIZER_KEYS

MODES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or weight stopped the run; the message is one line saying where,
    what, and how to continue."""


def bad_values(t: Tensor) -> int:
    """How many entries of ``t`` are NaN or ±inf (0 for tensors that are not floating point)."""
    if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard
    return int((~torch.isfinite(local.detach())).sum())


def first_nonfinite(named: Iterable[tuple[str, Any]]) -> str | None:
    """'<name> (<n> of <size> values NaN or inf)' for the first tensor that holds any, else None."""
    for name, t in named:
        n = bad_values(t)
        if n:
            return f"{name} ({n:,} of {t.numel():,} values NaN or inf)"
    return None


STOPPED = "stopped.json"  # next to a stage's last.ckpt: the stage stopped on a non-finite step


class StepGuard:
    """The non-finite policy of one stage's optimizer steps (``stages.<stage>.nonfinite`` and
    ``nonfinite_skips``) and its counts, which checkpoints keep. ``key``: where the stage's keys
    live (``stages.teacher_sft``, or ``tasks.1.teacher_sft`` for a task's own teacher); ``label``:
    the task, for a task's own teacher."""

    def __init__(self, stage: str, node: Mapping[str, Any], key: str = "", label: str = "") -> None:
        self.stage, self.steps = stage, int(node["steps"])
        self.mode, self.limit = node["nonfinite"], int(node["nonfinite_skips"])
        self.key, self.label = key or f"stages.{stage}", label
        self.skipped = 0  # steps skipped in this stage
        self.in_a_row = 0  # skipped since the last applied step
        self.calls = 0  # steps checked (the step number outside a fit)

    @property
    def title(self) -> str:
        return f"stage {self.stage}" + (f" (task {self.label})" if self.label else "")

    def state(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load(self, state: Mapping[str, Any]) -> None:
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))

    def check(self, step: int, grad_norm: Tensor, loss: Tensor, loss_name: str = "the loss",
              terms: Mapping[str, Tensor] | None = None) -> bool:
        """True: apply the update; False: skip it (mode skip). Raises NonFiniteStop to stop. ``terms``:
        a sum's terms by name, the same names in the same order on every rank. Every rank takes the
        same decision (one all-reduce of the finiteness flags); the message names the terms that are
        not finite, else the loss, else the gradient norm."""
        self.calls += 1
        terms = dict(terms or {})
        values = [*terms.values(), loss, grad_norm]
        flags = torch.stack([torch.stack([torch.isnan(v.detach()).any(), torch.isinf(v.detach()).any()]).cpu()
                             for v in values]).float()
        if dist.world() > 1:
            flags = dist.all_sum(flags.to(grad_norm.device)).cpu()
        names = [*terms, loss_name, "the gradient norm"]
        bad = [(name, nan, inf) for name, (nan, inf) in zip(names, flags.tolist()) if nan or inf]
        if not bad:
            self.in_a_row = 0
            return True
        first = [b for b in bad if b[0] in terms] or bad[:1]  # the most specific: the terms, the loss, the gradient
        what = ", ".join(f"{name} is {'nan' if nan and not inf else 'inf' if inf and not nan else 'nan or inf'}"
                         for name, nan, inf in first)
        where = f"{self.title}, optimizer step {step} of {self.steps}: {what}"
        if self.mode == "skip":
            self.skipped += 1
            self.in_a_row += 1
            if self.in_a_row < self.limit:
                return False
            raise NonFiniteStop(f"{where}; that is {self.in_a_row} skipped steps in a row ({self.key}.nonfinite_skips "
                                f"= {self.limit}), so the run stops; the weights were not updated",
                                f"a larger {self.key}.nonfinite_skips", step)
        raise NonFiniteStop(f"{where}; the weights were not updated", f"{self.key}.nonfinite=skip (drop such steps)",
                            step)


class NonFiniteStop(NonFiniteError):
    """A step that the guard stops at: the message, the change that lets the same command go on
    (``hint``), and the optimizer step (1-based)."""

    def __init__(self, message: str, hint: str, step: int) -> None:
        super().__init__(message)
        self.hint, self.step = hint, step


def clip_gradients(module: Any, parameters: Iterable[Tensor], max_norm: float | None) -> Tensor:
    """Clip the gradient norm (over every rank's shard where parameters are sharded) to ``max_norm``
    (None or 0: no clipping) and return the norm before clipping."""
    limit = max_norm or float("inf")
    wrapped = module.trainer.strategy.model if module._trainer is not None else None
    if wrapped is not None and hasattr(wrapped, "clip_grad_norm_"):  # FSDP: the norm over all shards
        return wrapped.clip_grad_norm_(limit).detach()
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), limit).detach()
    return norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP2: the norm over every shard


def guarded_step(module: Any, optimizer: Any, scheduler: Any, parameters: Iterable[Tensor],
                 max_norm: float | None, loss: Tensor, loss_name: str = "the loss",
                 terms: Mapping[str, Tensor] | None = None, batch_start: bool = True) -> Tensor:
    """One optimizer step of ``module`` (which holds a StepGuard as ``guard``), after its backward
    passes: clip, check (StepGuard.check: ``loss`` is this rank's loss of the step, ``terms`` a sum's
    terms), then step (or skip, or stop), zero the gradients and step the schedule. Returns the
    gradient norm before clipping. ``batch_start``: the step is the first of its batch (a later
    mini-batch of a rollout batch cannot be resumed from alone, so a stop there writes no checkpoint)."""
    params = list(parameters)
    norm = clip_gradients(module, params, max_norm)
    guard: StepGuard = module.guard
    trainer = module._trainer
    step = trainer.global_step + 1 if trainer is not None else guard.calls + 1
    before = guard.state()
    try:
        apply = guard.check(step, norm, loss, loss_name, terms)
    except NonFiniteStop as e:
        optimizer.zero_grad(set_to_none=True)
        guard.load(before)  # the checkpoint holds the state before this step: it is taken again on resume
        raise NonFiniteError(f"{e}. {_how_to_continue(module, e, batch_start)}") from None
    if not apply:  # the optimizer skips parameters without a gradient: nothing of this step is applied
        optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return norm


def checkpoint_now(module: Any) -> Path | None:
    """Write the stage's ``last.ckpt`` now, inside a step and before any update of its batch (so a
    resume takes that batch again); None when the run keeps no checkpoints. Every rank calls it."""
    trainer = module._trainer
    cb = trainer.checkpoint_callback if trainer is not None else None
    if cb is None or not cb.dirpath:
        return None
    path = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    module.saving_mid_step = True
    try:
        trainer.save_checkpoint(str(path), weights_only=False)
    finally:
        module.saving_mid_step = False
    return path


def _how_to_continue(module: Any, stop: NonFiniteStop, batch_start: bool) -> str:
    """Write the stop's checkpoint (the weights before the step that failed) and the marker that
    lets a changed config continue from it; say how to go on."""
    trainer, guard = module._trainer, module.guard
    cb = trainer.checkpoint_callback if trainer is not None else None
    if cb is None or not cb.dirpath:
        return "No checkpoint is kept (run.checkpoints is off), so the same command starts the stage again"
    path = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    if batch_start:
        checkpoint_now(module)
        held = f"{path} holds the weights from before this step"
    elif path.is_file():
        held = (f"the step is a later mini-batch of its rollout batch ({guard.key}.num_mini_batches), which no checkpoint "
                f"can split; {path} holds the weights of the last checkpoint before it")
    else:
        return (f"The step is a later mini-batch of its rollout batch ({guard.key}.num_mini_batches) and no checkpoint was "
                f"written before it (run.checkpoint_every), so the same command starts the stage again")
    if dist.is_main():
        (path.parent / STOPPED).write_text(json.dumps({"step": stop.step, "message": str(stop)}))
    dist.barrier()
    return (f"{held}: the same command continues from it with {stop.hint}, or with other optimizer settings of the "
            f"stage ({guard.key}.{', '.join(OPTIMIZER_KEYS)})")


def check_checkpoint(checkpoint: Mapping[str, Any], stage: str, device: torch.device) -> None:
    """NonFiniteError when a checkpoint about to be written holds non-finite weights; every rank
    takes the same decision (its flag is summed over ranks)."""
    bad = first_nonfinite(checkpoint.get("state_dict", {}).items())
    flag = torch.tensor([0.0 if bad is None else 1.0], device=device)
    if dist.world() > 1:
        flag = dist.all_sum(flag)
    if float(flag.item()):
        raise NonFiniteError(f"stage {stage}: the weights hold non-finite values ({bad or 'on another process'}); "
                             f"no checkpoint was written")
