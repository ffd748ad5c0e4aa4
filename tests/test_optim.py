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
