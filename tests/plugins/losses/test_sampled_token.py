"""Sampled-token OPD: PPO-clipped policy gradient with reward log q - log π_old."""

from __future__ import annotations

import math

import plugin_testkit
import pytest
import torch

from opdlm.errors import ConfigError
from opdlm.registry import LOSSES
from opdlm.types import Scores

kit = plugin_testkit
make_loss_inputs = kit.build_loss_inputs


def _loss(**opts):
    return LOSSES.build({"name": "sampled_token", **opts}, "loss")


def _scores(token_logprob: torch.Tensor) -> Scores:
    return Scores(token_logprob=token_logprob, lse=torch.zeros_like(token_logprob.detach()))


def _surrogate(ratio: float, adv: float, eps: float, dual: float | None) -> float:
    """PPO clipped surrogate (as a loss), with the dual clip for negative advantages, in plain Python."""
    clipped_ratio = min(max(ratio, 1.0 - eps), 1.0 + eps)
    value = max(-adv * ratio, -adv * clipped_ratio)
    if dual is not None and adv < 0:
        value = min(value, -adv * dual)
    return value


def test_gradient_at_ratio_one_is_minus_advantage():
    g = torch.Generator().manual_seed(0)
    B, T = 3, 7
    logprob = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    teacher_lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    mask = torch.rand(B, T, generator=g) < 0.7
    inputs = make_loss_inputs(student=_scores(logprob), teacher=_scores(teacher_lp),
                              old_logprob=logprob.detach(), mask=mask)
    out = _loss().compute(inputs)
    (out.token_loss * mask).sum().backward()
    adv = teacher_lp.detach() - logprob.detach()
    want = torch.where(mask, -adv, torch.zeros_like(adv))
    torch.testing.assert_close(logprob.grad, want, atol=1e-14, rtol=1e-12)
    assert teacher_lp.grad is None
    assert (adv > 0).any() and (adv < 0).any()
    # at ratio 1 the loss value is -A and nothing is clipped
    torch.testing.assert_close(out.token_loss.detach(), -adv, atol=1e-14, rtol=0)
    assert out.stats["clip_frac"].item() == 0.0
    m = mask.double()
    assert out.stats["advantage"].item() == pytest.approx(((adv * m).sum() / m.sum()).item(), rel=1e-12)


# (ratio, advantage, expected loss with eps=0.2, c=3, whether clipping is active)
CASES = [
    (1.5, 1.0, -1.2, True),     # A > 0, ratio above 1+eps: clipped at 1.2
    (1.1, 1.0, -1.1, False),    # A > 0, inside the range
    (0.5, 1.0, -0.5, False),    # A > 0, ratio below 1-eps: the unclipped term is larger
    (0.5, -1.0, 0.8, True),     # A < 0, ratio below 1-eps: clipped at 0.8
    (0.9, -2.0, 1.8, False),    # A < 0, inside the range
    (1.5, -1.0, 1.5, False),    # A < 0, ratio above 1+eps but below c: unclipped
    (2.5, -2.0, 5.0, False),    # A < 0, ratio below c
    (5.0, -1.0, 3.0, True),     # A < 0, ratio above c: dual clip at c·|A|
    (4.0, -0.5, 1.5, True),     # dual clip again
    (4.0, 0.5, -0.6, True),     # A > 0, large ratio: clipped at 1+eps
]


def test_clipped_surrogate_values_and_gradients():
    ratio = torch.tensor([c[0] for c in CASES], dtype=torch.float64)
    adv = torch.tensor([c[1] for c in CASES], dtype=torch.float64)
    old = -torch.linspace(0.3, 3.0, len(CASES), dtype=torch.float64)
    logprob = (old + torch.log(ratio)).unsqueeze(0).requires_grad_(True)
    teacher_lp = (old + adv).unsqueeze(0)
    inputs = make_loss_inputs(student=_scores(logprob), teacher=_scores(teacher_lp), old_logprob=old.unsqueeze(0))
    out = _loss(clip_eps=0.2, dual_clip=3.0).compute(inputs)
    out.token_loss.sum().backward()
    for i, (r, a, want, clipped) in enumerate(CASES):
        assert _surrogate(r, a, 0.2, 3.0) == pytest.approx(want, rel=1e-12)
        assert out.token_loss[0, i].item() == pytest.approx(want, rel=1e-10), CASES[i]
        # d/dlogprob (-A·ratio) = -A·ratio where unclipped; 0 where the clip is active
        want_grad = 0.0 if clipped else -a * r
        assert logprob.grad[0, i].item() == pytest.approx(want_grad, rel=1e-10, abs=1e-14), CASES[i]
    n_clipped = sum(c[3] for c in CASES)
    assert out.stats["clip_frac"].item() == pytest.approx(n_clipped / len(CASES), rel=1e-12)


@pytest.mark.parametrize("eps,dual", [(0.2, 3.0), (0.1, None), (0.3, 2.0)])
def test_random_ratios_match_plain_reimplementation(eps, dual):
    g = torch.Generator().manual_seed(7)
    B, T = 4, 25
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    log_ratio = (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 3  # ratios in [0.22, 4.5]
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    logprob = (old + log_ratio).requires_grad_(True)
    out = _loss(clip_eps=eps, dual_clip=dual).compute(
        make_loss_inputs(student=_scores(logprob), teacher=_scores(old + adv), old_logprob=old))
    out.token_loss.sum().backward()
    h = 1e-6
    n_clip = 0
    for b in range(B):
        for t in range(T):
            r, a = math.exp(log_ratio[b, t].item()), adv[b, t].item()
            want = _surrogate(r, a, eps, dual)
            assert out.token_loss[b, t].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
            # central finite difference in log-prob space, as an independent gradient reference
            fd = (_surrogate(r * math.exp(h), a, eps, dual) - _surrogate(r * math.exp(-h), a, eps, dual)) / (2 * h)
            assert logprob.grad[b, t].item() == pytest.approx(fd, rel=1e-6, abs=1e-8)
            n_clip += fd == 0.0
    assert 0 < n_clip < B * T  # both regimes were exercised


def test_no_dual_clip_leaves_large_ratios_unbounded():
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    logprob = (old + math.log(5.0)).requires_grad_(True)
    inputs = make_loss_inputs(student=_scores(logprob), teacher=_scores(old - 1.0), old_logprob=old)
    with_dual = _loss().compute(inputs).token_loss.item()
    without = _loss(dual_clip=None).compute(inputs).token_loss.item()
    assert with_dual == pytest.approx(3.0, rel=1e-12)
    assert without == pytest.approx(5.0, rel=1e-12)


@pytest.mark.parametrize("opts,key", [
    ({"clip_eps": 0}, "clip_eps"), ({"clip_eps": -0.1}, "clip_eps"),
    ({"dual_clip": 1}, "dual_clip"), ({"dual_clip": 0.5}, "dual_clip"),
])
def test_bad_options_raise(opts, key):
    with pytest.raises(ConfigError) as e:
        _loss(**opts)
    assert str(e.value).startswith(f"loss.{key}:")


def test_defaults():
    loss = _loss()
    assert loss.clip_eps == 0.2 and loss.dual_clip == 3.0
