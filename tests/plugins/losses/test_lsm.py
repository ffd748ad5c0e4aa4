"""LSM loss: renormalised truncated reverse KL on the support, checked against hand computations."""

from __future__ import annotations

import math

import plugin_testkit
import pytest
import torch

from opdlm.errors import ConfigError
from opdlm.plugin_api import Context
from opdlm.registry import LOSSES, SUPPORTS
from opdlm.types import Scores, Support

kit = plugin_testkit
make_loss_inputs = kit.build_loss_inputs
char_tok = kit.char_tok()


def _lsm():
    return LOSSES.build({"name": "lsm"}, "loss")


def _scores(support_logits: torch.Tensor, lse: torch.Tensor | None = None, outside: float = 0.0) -> Scores:
    """Scores whose full-vocabulary log-sum-exp is the support's plus ``outside`` (mass left out of
    the support), so that a loss that forgot to renormalise on the support gives other values."""
    B, T, _ = support_logits.shape
    if lse is None:
        lse = torch.logsumexp(support_logits.detach(), -1) + outside
    return Scores(token_logprob=torch.zeros(B, T, dtype=support_logits.dtype), lse=lse,
                  support_logits=support_logits)


def _kl_by_hand(zs: list[float], zt: list[float]) -> float:
    """Σ_v p_v log(p_v / q_v) with p = softmax(zs), q = softmax(zt), in plain Python."""
    ms, mt = max(zs), max(zt)
    es = [math.exp(z - ms) for z in zs]
    et = [math.exp(z - mt) for z in zt]
    ss, st = sum(es), sum(et)
    out = 0.0
    for a, b in zip(es, et):
        p, q = a / ss, b / st
        out += p * math.log(p / q)
    return out


def test_registered_without_options():
    loss = _lsm()
    assert type(loss).plugin_name == "lsm"
    with pytest.raises(ConfigError, match=r"loss\.k: unknown key"):
        LOSSES.build({"name": "lsm", "k": 4}, "loss")


def test_zero_when_logits_agree_up_to_a_shift():
    g = torch.Generator().manual_seed(0)
    B, T, K = 3, 4, 6
    zs = torch.randn(B, T, K, generator=g, dtype=torch.float64) * 3
    shift = torch.randn(B, T, 1, generator=g, dtype=torch.float64) * 10
    out = _lsm().compute(make_loss_inputs(student=_scores(zs, outside=1.0),
                                          teacher=_scores(zs + shift, outside=0.3)))
    assert out.token_loss.shape == (B, T)
    torch.testing.assert_close(out.token_loss, torch.zeros(B, T, dtype=torch.float64), atol=1e-12, rtol=0)
    # a shift that varies over the support is not a no-op: the loss is then strictly positive
    tilt = torch.linspace(0, 2, K, dtype=torch.float64)
    out = _lsm().compute(make_loss_inputs(student=_scores(zs), teacher=_scores(zs + shift + tilt)))
    assert (out.token_loss > 1e-6).all()


@pytest.mark.parametrize("seed", [1, 2])
def test_full_support_is_full_vocabulary_reverse_kl(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, V = 2, 3, 7
    zs = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ids = torch.arange(V).expand(B, T, V)
    support = Support(ids=ids, valid=torch.ones(B, T, V, dtype=torch.bool))
    out = _lsm().compute(make_loss_inputs(student=_scores(zs), teacher=_scores(zt), support=support))
    for b in range(B):
        for t in range(T):
            want = _kl_by_hand(zs[b, t].tolist(), zt[b, t].tolist())
            assert out.token_loss[b, t].item() == pytest.approx(want, rel=1e-10, abs=1e-13)
            assert want > 1e-3


def test_gradient_matches_closed_form():
    g = torch.Generator().manual_seed(3)
    B, T, K = 2, 5, 6
    zs = (torch.randn(B, T, K, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    zt = (torch.randn(B, T, K, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64)  # distinct weight per position
    out = _lsm().compute(make_loss_inputs(student=_scores(zs, outside=0.7), teacher=_scores(zt, outside=2.0)))
    (out.token_loss * weights).sum().backward()
    assert zt.grad is None  # teacher logits get no gradient
    with torch.no_grad():
        ps = torch.exp(zs) / torch.exp(zs).sum(-1, keepdim=True)
        qs = torch.exp(zt) / torch.exp(zt).sum(-1, keepdim=True)
        ell = torch.log(ps) - torch.log(qs)
        ell_bar = (ps * ell).sum(-1, keepdim=True)
        want = ps * (ell - ell_bar) * weights.unsqueeze(-1)
    torch.testing.assert_close(zs.grad, want, atol=1e-13, rtol=1e-10)
    assert want.abs().max() > 1e-3


def test_invalid_entries_are_excluded_and_get_no_gradient():
    g = torch.Generator().manual_seed(4)
    B, T, K = 3, 4, 6
    zs = (torch.randn(B, T, K, generator=g, dtype=torch.float64) * 2)
    zt = torch.randn(B, T, K, generator=g, dtype=torch.float64) * 2
    valid = torch.rand(B, T, K, generator=g) < 0.6
    valid[..., :2] = True  # at least two valid entries per position
    valid[0, 0] = torch.tensor([True, True, False, False, False, False])
    # make invalid entries loud: if they leaked in, they would dominate both softmaxes
    zs = torch.where(valid, zs, torch.full_like(zs, 30.0)).requires_grad_(True)
    zt = torch.where(valid, zt, torch.full_like(zt, -30.0))
    ids = torch.arange(K).expand(B, T, K)
    out = _lsm().compute(make_loss_inputs(student=_scores(zs, outside=0.5), teacher=_scores(zt, outside=1.5),
                                          support=Support(ids=ids, valid=valid)))
    out.token_loss.sum().backward()
    for b in range(B):
        for t in range(T):
            keep = valid[b, t]
            s_sub = zs[b, t][keep].tolist()
            t_sub = zt[b, t][keep].tolist()
            want = _kl_by_hand(s_sub, t_sub)
            assert out.token_loss[b, t].item() == pytest.approx(want, rel=1e-10, abs=1e-13)
            # gradient on the valid subset: the closed form computed on the subset alone
            ms = max(s_sub)
            es = [math.exp(z - ms) for z in s_sub]
            mt = max(t_sub)
            et = [math.exp(z - mt) for z in t_sub]
            p = [e / sum(es) for e in es]
            q = [e / sum(et) for e in et]
            ell = [math.log(a / c) for a, c in zip(p, q)]
            ell_bar = sum(a * c for a, c in zip(p, ell))
            grad_sub = [a * (c - ell_bar) for a, c in zip(p, ell)]
            torch.testing.assert_close(zs.grad[b, t][keep],
                                       torch.tensor(grad_sub, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    assert (zs.grad[~valid] == 0).all()
    assert (~valid).sum() > 3


def test_all_invalid_position_is_zero_and_finite():
    B, T, K = 1, 2, 4
    zs = torch.randn(B, T, K, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(B, T, K, dtype=torch.float64)
    valid = torch.ones(B, T, K, dtype=torch.bool)
    valid[0, 1] = False
    out = _lsm().compute(make_loss_inputs(student=_scores(zs), teacher=_scores(zt),
                                          support=Support(ids=torch.arange(K).expand(B, T, K), valid=valid)))
    assert out.token_loss[0, 1].item() == 0.0
    out.token_loss.sum().backward()
    assert torch.isfinite(zs.grad).all()
    assert (zs.grad[0, 1] == 0).all()


def test_student_support_mass_stat():
    g = torch.Generator().manual_seed(5)
    B, T, K = 2, 3, 4
    zs = torch.randn(B, T, K, generator=g, dtype=torch.float64)
    lse = torch.logsumexp(zs, -1) + torch.rand(B, T, generator=g, dtype=torch.float64)  # mass < 1
    valid = torch.ones(B, T, K, dtype=torch.bool)
    valid[1, 2, 3] = False
    mask = torch.tensor([[True, False, True], [True, True, True]])
    out = _lsm().compute(make_loss_inputs(student=_scores(zs, lse), teacher=_scores(zs.clone()),
                                          support=Support(ids=torch.arange(K).expand(B, T, K), valid=valid),
                                          mask=mask))
    total, n = 0.0, 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                total += sum(math.exp(zs[b, t, k].item() - lse[b, t].item()) for k in range(K) if valid[b, t, k])
                n += 1
    assert out.stats["student_support_mass"].item() == pytest.approx(total / n, rel=1e-10)


def _ctx(tok) -> Context:
    return Context(student_tokenizer=tok, teacher_tokenizer=tok, student_vocab_rows=len(tok),
                   teacher_vocab_rows=len(tok))


def test_check_support_rejects_size_one():
    loss = _lsm()
    k1 = SUPPORTS.build({"name": "teacher_topk", "k": 1}, "support")
    k1.bind(_ctx(char_tok))
    with pytest.raises(ConfigError) as e:
        loss.check_support(k1, "support")
    assert str(e.value).startswith("support.k:")
    assert "lsm" in str(e.value)
    sampled = SUPPORTS.build({"name": "sampled_token"}, "support")
    with pytest.raises(ConfigError) as e:
        loss.check_support(sampled, "support")
    assert str(e.value).startswith("support.name:")
    assert "sampled_token" in str(e.value)
    # sizes >= 2 are accepted
    loss.check_support(SUPPORTS.build({"name": "teacher_topk", "k": 2}, "support"), "support")
