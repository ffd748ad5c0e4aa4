"""The learning-rate schedule against its closed form, and against transformers' cosine schedule
with a floor once the warm-up is over (transformers' warm-up starts at 0: step/warmup; opdlm's
trains from the first step: (step + 1)/warmup)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from opdlm.optim import lr_lambda


@pytest.mark.parametrize("warmup,total", [(0, 50), (10, 50), (5, 6)])
def test_cosine_schedule_closed_form_and_transformers_after_warmup(warmup, total):
    f = lr_lambda(warmup, total, "cosine")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    hf = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=0.1)
    for step in range(total + 3):
        if step < warmup:
            want = (step + 1) / warmup
        else:
            frac = min(1.0, (step - warmup) / max(1, total - warmup))
            want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
            if step <= total:
                assert f(step) == pytest.approx(hf.lr_lambdas[0](step), abs=1e-12)
        assert f(step) == pytest.approx(want, abs=1e-12)
    assert f(total) == pytest.approx(0.1) and f(total + 10) == pytest.approx(0.1)


def test_constant_schedule_with_warmup():
    f = lr_lambda(4, 100, "constant")
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_lambda(0, 100, "constant")(0) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_adamw_implementation_gives_the_same_step(dtype):
    """Three AdamW steps of each implementation from the same weights and gradients: the same weights
    up to rounding (fused and foreach against the one-tensor-at-a-time loop), and auto is fused here."""
    from opdlm.optim import adamw_impl, make_optimizer
    st = {"lr": 1e-2, "weight_decay": 0.01, "betas": [0.9, 0.98], "eps": 1e-8, "warmup_steps": 0, "steps": 10,
          "schedule": "constant"}
    torch.manual_seed(0)
    start = [torch.randn(37, 11, dtype=dtype), torch.randn(5, dtype=dtype), torch.randn(3, 4, 2, dtype=dtype)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(3)]
    out = {}
    for impl in ("loop", "foreach", "fused", "auto"):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = make_optimizer(None, params, {**st, "optimizer_impl": impl})["optimizer"]
        assert bool(opt.defaults["fused"]) is (impl in ("fused", "auto"))  # (CPU float tensors: auto is fused)
        assert bool(opt.defaults["foreach"]) is (impl == "foreach")
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        out[impl] = torch.cat([p.detach().flatten() for p in params])
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    moved = (out["loop"] - torch.cat([w.flatten() for w in start])).abs().max()
    assert moved > 1e-3  # the steps changed the weights
    for impl in ("foreach", "fused", "auto"):
        assert (out[impl] - out["loop"]).abs().max() <= tol * max(1.0, float(out["loop"].abs().max())), impl
    assert adamw_impl([torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)], "auto") == {"foreach": True}
