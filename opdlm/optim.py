"""The optimizer and learning-rate schedule every stage uses: AdamW with a linear warm-up, then a
constant rate or a cosine decay to 10 % of it.

After the warm-up the cosine is transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` with
``min_lr_rate=0.1`` (tests/test_optim.py checks they agree); the warm-up is not: transformers' starts
at 0 (step / warmup), so its first step does not train, while this one trains at
(step + 1) / warmup from the first step. Hence the small lambda here instead of the library's."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch


def lr_lambda(warmup: int, total: int, schedule: str):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine" and total > warmup:
            frac = (step - warmup) / max(1, total - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return 1.0
    return f


#: the keys of a stage node that set its optimizer and schedule (a stage stopped by a non-finite step
#: continues from its checkpoint when only these, and the nonfinite keys, changed: opdlm.guard)
OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay", "warmup_steps", "schedule", "max_grad_norm")

#: stages.<stage>.optimizer_impl: torch's AdamW implementations (the same update up to rounding)
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "loop")


def retune(checkpoint: dict[str, Any], st: dict[str, Any]) -> None:
    """Give a checkpoint's optimizer and schedule states the stage's current settings (lr, betas, eps,
    weight decay; the schedule's base rate and the rate of its current step), so that a stage that
    continues from it under changed optimizer keys trains with the new ones. For a checkpoint of the
    same settings it writes back the values it holds."""
    scheds = checkpoint.get("lr_schedulers") or []
    done = int(scheds[0].get("last_epoch", 0)) if scheds else 0
    rate = st["lr"] * lr_lambda(st["warmup_steps"], st["steps"], st["schedule"])(done)
    for opt in checkpoint.get("optimizer_states") or []:
        for group in opt.get("param_groups", []):
            group.update(lr=rate, initial_lr=st["lr"], betas=tuple(st["betas"]), eps=st["eps"],
                         weight_decay=st["weight_decay"])
    for sched in scheds:
        n = len(sched.get("base_lrs", [])) or 1
        sched.update(base_lrs=[st["lr"]] * n, _last_lr=[rate] * n)


def adamw_impl(params: list[torch.Tensor], impl: str) -> dict[str, bool]:
    """AdamW's keyword for ``impl``: fused (one kernel per step over all tensors; CUDA, CPU, XPU, MPS and
    float dtypes), foreach (tensors grouped per operation), loop (one tensor at a time, torch's CPU
    default). ``auto``: fused where every parameter allows it (a plain tensor on such a device, of a
    float dtype), else foreach."""
    if impl == "auto":
        fusable = all(type(p) is torch.nn.Parameter or type(p) is torch.Tensor for p in params) and all(
            p.device.type in ("cuda", "cpu", "xpu", "mps") and p.dtype in (torch.float16, torch.bfloat16, torch.float32,
                                                                           torch.float64) for p in params)
        impl = "fused" if fusable else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]


def make_optimizer(module: L.LightningModule, params: Any, st: dict[str, Any]) -> Any:
    params = list(params)
    opt = torch.optim.AdamW(params, lr=st["lr"], weight_decay=st["weight_decay"], betas=tuple(st["betas"]),
                            eps=st["eps"], **adamw_impl(params, st.get("optimizer_impl", "auto")))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(st["warmup_steps"], st["steps"], st["schedule"]))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
