"""lsm_unnormalised, forward_kl_topk, tail_aware and jsd against plain computations from the full
logits (written here, not with the plugins' helpers), their gradients against autograd of those
computations, and their limits (K = V, beta = 0 / 0.5 / 1, agreement)."""

from __future__ import annotations

import math

import plugin_testkit as kit
import pytest
import torch

from opdlm.errors import ConfigError
from opdlm.registry import LOSSES
from opdlm.types import Scores, Support

B, T, V = 2, 3, 7


def make(K: int, seed: int, same: bool = False):
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    zt = zs.detach().clone() if same else torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ids = torch.rand(B, T, V, generator=g).argsort(-1)[..., :K]  # K distinct random ids
    return zs, zt, ids


def scores(z, ids):
    return Scores(token_logprob=torch.zeros(B, T, dtype=z.dtype), lse=torch.logsumexp(z, -1),
                  support_logits=z.gather(-1, ids))


def run(name, zs, zt, ids, valid=None, **opts):
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
    loss = LOSSES.build({"name": name, **opts})
    inputs = kit.build_loss_inputs(student=scores(zs, ids), teacher=scores(zt, ids),
                                   support=Support(ids=ids, valid=valid))
    return loss.compute(inputs).token_loss


def probs(z):  # full-softmax probabilities as python floats, per position
    e = [math.exp(x) for x in z]
    return [x / sum(e) for x in e]


def ref_value(name, zs, zt, ids, **opts):
    """Per-position reference with python floats."""
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            p, q = probs(zs[b, t].tolist()), probs(zt[b, t].tolist())
            S = ids[b, t].tolist()
            pS, qS = [p[v] for v in S], [q[v] for v in S]
            rp, rq = [x / sum(pS) for x in pS], [x / sum(qS) for x in qS]
            if name == "lsm_unnormalised":
                val = sum(a * math.log(a / c) for a, c in zip(pS, qS))
            elif name == "forward_kl_topk":
                a_, c_ = (rp, rq) if opts.get("renormalise") else (pS, qS)
                val = sum(c * math.log(c / a) for a, c in zip(a_, c_))
            elif name == "tail_aware":
                pt, qt = 1 - sum(pS), 1 - sum(qS)
                val = sum(a * math.log(a / c) for a, c in zip(pS, qS))
                if pt > 1e-12:
                    val += pt * math.log(pt / qt)
            elif name == "jsd":
                beta = opts["beta"]
                m = [beta * c + (1 - beta) * a for a, c in zip(rp, rq)]
                val = (beta * sum(c * math.log(c / mm) for c, mm in zip(rq, m))
                       + (1 - beta) * sum(a * math.log(a / mm) for a, mm in zip(rp, m)))
            out[b, t] = val
    return out


def ref_torch(name, zs, zt, ids, **opts):
    """The same formulas in torch, for autograd."""
    lp, lq = torch.log_softmax(zs, -1).gather(-1, ids), torch.log_softmax(zt, -1).gather(-1, ids)
    p, q = lp.exp(), lq.exp()
    rp, rq = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    if name == "lsm_unnormalised":
        return (p * (lp - lq)).sum(-1)
    if name == "forward_kl_topk":
        a, c = (rp, rq) if opts.get("renormalise") else (p, q)
        return (c * (c.log() - a.log())).sum(-1)
    if name == "tail_aware":
        pt, qt = 1 - p.sum(-1), 1 - q.sum(-1)
        return (p * (lp - lq)).sum(-1) + pt * (pt.log() - qt.log())
    if name == "jsd":
        beta = opts["beta"]
        m = beta * rq + (1 - beta) * rp
        return beta * (rq * (rq.log() - m.log())).sum(-1) + (1 - beta) * (rp * (rp.log() - m.log())).sum(-1)
    raise KeyError(name)


CASES = [("lsm_unnormalised", {}), ("forward_kl_topk", {}), ("forward_kl_topk", {"renormalise": True}),
         ("tail_aware", {}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.9})]


@pytest.mark.parametrize("name,opts", CASES)
def test_value_and_gradient_match_plain_computation(name, opts):
    zs, zt, ids = make(4, seed=1)
    got = run(name, zs, zt, ids, **opts)
    torch.testing.assert_close(got.detach(), ref_value(name, zs.detach(), zt, ids, **opts), atol=1e-10, rtol=1e-9)
    w = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (g,) = torch.autograd.grad((got * w).sum(), zs)
    (want,) = torch.autograd.grad((ref_torch(name, zs, zt, ids, **opts) * w).sum(), zs)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(g, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name,opts", CASES)
def test_zero_when_student_equals_teacher(name, opts):
    zs, zt, ids = make(4, seed=2, same=True)
    got = run(name, zs, zt, ids, **opts)
    torch.testing.assert_close(got.detach(), torch.zeros(B, T, dtype=torch.float64), atol=1e-12, rtol=0)


def full_reverse_kl(zs, zt):
    lp, lq = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@pytest.mark.parametrize("name", ["lsm_unnormalised", "tail_aware"])
def test_full_support_is_the_full_reverse_kl(name):
    zs, zt, ids = make(V, seed=3)
    torch.testing.assert_close(run(name, zs, zt, ids).detach(), full_reverse_kl(zs.detach(), zt), atol=1e-12, rtol=1e-9)


def test_tail_aware_gradient_is_finite_with_full_support():
    zs, zt, ids = make(V, seed=4)
    (g,) = torch.autograd.grad(run("tail_aware", zs, zt, ids).sum(), zs)
    (want,) = torch.autograd.grad(full_reverse_kl(zs, zt).sum(), zs)
    torch.testing.assert_close(g, want, atol=1e-7, rtol=1e-6)


def test_forward_kl_with_full_support_is_the_full_forward_kl():
    zs, zt, ids = make(V, seed=5)
    lp, lq = torch.log_softmax(zs.detach(), -1), torch.log_softmax(zt, -1)
    want = (lq.exp() * (lq - lp)).sum(-1)
    torch.testing.assert_close(run("forward_kl_topk", zs, zt, ids).detach(), want, atol=1e-12, rtol=1e-9)


def test_jsd_ends_are_forward_and_reverse_kl():
    zs, zt, ids = make(4, seed=6)
    fwd = ref_value("forward_kl_topk", zs.detach(), zt, ids, renormalise=True)
    rev = run("lsm", zs, zt, ids).detach()  # renormalised reverse KL on the support
    torch.testing.assert_close(run("jsd", zs, zt, ids, beta=0.0).detach(), fwd, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(run("jsd", zs, zt, ids, beta=1.0).detach(), rev, atol=1e-12, rtol=1e-9)


def test_jsd_is_symmetric_at_one_half():
    zs, zt, ids = make(5, seed=7)
    a = run("jsd", zs, zt, ids, beta=0.5).detach()
    b = run("jsd", zt.clone().requires_grad_(True), zs.detach(), ids, beta=0.5).detach()
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)
    assert a.min() > 1e-4


def test_invalid_entries_are_left_out():
    zs, zt, ids = make(5, seed=8)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[..., 3:] = False
    for name, opts in CASES:
        got = run(name, zs, zt, ids, valid=valid, **opts).detach()
        want = run(name, zs, zt, ids[..., :3], **opts).detach()
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_jsd_beta_out_of_range(beta):
    with pytest.raises(ConfigError, match=rf"^loss\.beta: must be in \[0, 1\], got {beta}$"):
        LOSSES.build({"name": "jsd", "beta": beta}, "loss")
