"""discounted_pg and entropy_aware against plain computations: γ = 0 is the sampled-token loss,
γ = 1 the reward-to-go policy gradient, sums stop at response ends; entropy_aware reduces to the
sampled-token loss above every teacher entropy and adds α·forward KL where it gates."""

from __future__ import annotations

import math

import plugin_testkit as kit
import pytest
import torch

from opdlm.errors import ConfigError
from opdlm.registry import LOSSES
from opdlm.types import Scores, Support

B, T, K = 3, 6, 4


def inputs(seed: int, *, ratio_one: bool = True, mask=None, teacher_entropy=None):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    old = lp.detach().clone() if ratio_one else lp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    tq = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    zs = torch.randn(B, T, K, generator=g, dtype=torch.float64).requires_grad_(True)
    zt = torch.randn(B, T, K, generator=g, dtype=torch.float64)
    lse_s, lse_t = torch.logsumexp(zs, -1) + 0.5, torch.logsumexp(zt, -1) + 0.2  # mass outside the support
    student = Scores(token_logprob=lp, lse=lse_s, support_logits=zs)
    teacher = Scores(token_logprob=tq, lse=lse_t, support_logits=zt,
                     entropy=teacher_entropy if teacher_entropy is not None else torch.rand(B, T, generator=g, dtype=torch.float64) * 2)
    ids = torch.arange(K).expand(B, T, K)
    return kit.build_loss_inputs(student=student, teacher=teacher, old_logprob=old, mask=mask,
                                 support=Support(ids=ids, valid=torch.ones(B, T, K, dtype=torch.bool)))


def loss_of(name, x, **opts):
    return LOSSES.build({"name": name, **opts}).compute(x).token_loss


@pytest.mark.parametrize("ratio_one", [True, False])
def test_gamma_zero_is_the_sampled_token_loss(ratio_one):
    x = inputs(1, ratio_one=ratio_one)
    a = loss_of("discounted_pg", x, gamma=0.0)
    b = loss_of("sampled_token", x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    (ga,) = torch.autograd.grad(a.sum(), x.student.token_logprob)
    (gb,) = torch.autograd.grad(b.sum(), x.student.token_logprob)
    torch.testing.assert_close(ga, gb, atol=0, rtol=0)


def reference_advantage(x, gamma, mask):
    """A_t = -Σ_{t'≥t, same response} γ^{t'-t} (log π_old - log q), python loops."""
    old, tq = x.old_logprob.tolist(), x.teacher.token_logprob.tolist()
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            out[b, t] = -sum(gamma ** (u - t) * (old[b][u] - tq[b][u]) for u in range(t, T) if mask[b][u])
    return out


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_gradient_is_the_discounted_reward_to_go_policy_gradient(gamma):
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False  # response 0 ends early: later costs must not count
    mask[2, 2] = False   # a masked special token adds no cost
    x = inputs(2, mask=mask)
    loss = loss_of("discounted_pg", x, gamma=gamma)
    (g,) = torch.autograd.grad((loss * mask).sum(), x.student.token_logprob)
    adv = reference_advantage(x, gamma, mask.tolist())
    assert adv.abs().max() > 0.1
    # at ratio 1 the gradient of -A·ratio w.r.t. log π is -A on counted positions
    torch.testing.assert_close(g, -adv * mask, atol=1e-12, rtol=1e-10)


def test_entropy_aware_above_every_entropy_is_sampled_token():
    x = inputs(3, ratio_one=False)
    tau = float(x.teacher.entropy.max()) + 0.1
    torch.testing.assert_close(loss_of("entropy_aware", x, tau=tau), loss_of("sampled_token", x), atol=0, rtol=0)


def test_entropy_aware_adds_forward_kl_where_gated():
    ent = torch.tensor([[0.1, 2.0, 0.9, 0.7, 1.5, 0.0]] * B, dtype=torch.float64)
    x = inputs(4, teacher_entropy=ent)
    got = loss_of("entropy_aware", x, tau=0.8, alpha=0.5)
    base = loss_of("sampled_token", x)
    zs, zt = x.student.support_logits.detach(), x.teacher.support_logits
    want = base.detach().clone()
    for b in range(B):
        for t in range(T):
            if ent[b, t] > 0.8:
                fkl = 0.0
                for k in range(K):
                    q = math.exp(zt[b, t, k] - x.teacher.lse[b, t])
                    p = math.exp(zs[b, t, k] - x.student.lse[b, t].detach())
                    fkl += q * math.log(q / p)
                want[b, t] += 0.5 * fkl
    torch.testing.assert_close(got.detach(), want, atol=1e-12, rtol=1e-10)
    assert (got.detach() - base.detach()).abs().max() > 1e-3


@pytest.mark.parametrize("node,msg", [
    ({"name": "discounted_pg", "gamma": 1.5}, r"^loss\.gamma: must be in \[0, 1\], got 1.5$"),
    ({"name": "discounted_pg", "gamma": -0.1}, r"^loss\.gamma: must be in \[0, 1\], got -0.1$"),
    ({"name": "entropy_aware", "tau": -1.0}, r"^loss\.tau: must be >= 0, got -1.0$"),
    ({"name": "entropy_aware", "alpha": -1.0}, r"^loss\.alpha: must be >= 0, got -1.0$"),
])
def test_out_of_range_options(node, msg):
    with pytest.raises(ConfigError, match=msg):
        LOSSES.build(node, "loss")


def test_trust_region_mixes_policy_gradient_and_forward_kl_by_min_ratio():
    x = inputs(5, ratio_one=False)
    got = loss_of("trust_region", x)
    pg = loss_of("sampled_token", x).detach()
    w = torch.tensor([[min(math.exp(q - o), 1.0) for q, o in zip(qr, orow)]
                      for qr, orow in zip(x.teacher.token_logprob.tolist(), x.old_logprob.tolist())], dtype=torch.float64)
    zs, zt = x.student.support_logits.detach(), x.teacher.support_logits
    fkl = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for k in range(K):
                q = math.exp(zt[b, t, k] - x.teacher.lse[b, t])
                p = math.exp(zs[b, t, k] - x.student.lse[b, t].detach())
                fkl[b, t] += q * math.log(q / p)
    torch.testing.assert_close(got.detach(), w * pg + (1 - w) * fkl, atol=1e-12, rtol=1e-10)
    assert 0 < w.min() < 1 and w.max() == 1.0  # both regimes occur


def test_trust_region_with_a_teacher_above_the_student_is_sampled_token():
    x = inputs(6, ratio_one=False)
    lifted = x.__class__(**{**x.__dict__, "teacher": x.teacher.__class__(
        **{**x.teacher.__dict__, "token_logprob": x.old_logprob + 0.1})})
    torch.testing.assert_close(loss_of("trust_region", lifted), loss_of("sampled_token", lifted), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["sampled_token", "discounted_pg", "entropy_aware", "trust_region"])
def test_zero_when_teacher_equals_student(name):
    x = inputs(7)
    same = x.teacher.__class__(token_logprob=x.old_logprob.clone(), lse=x.student.lse.detach().clone(),
                               support_logits=x.student.support_logits.detach().clone(),
                               entropy=torch.full((B, T), 5.0, dtype=torch.float64))  # all gated
    y = x.__class__(**{**x.__dict__, "teacher": same})
    torch.testing.assert_close(loss_of(name, y).detach(), torch.zeros(B, T, dtype=torch.float64), atol=1e-12, rtol=0)


def reference_torch(name, x, tau=0.8, alpha=1.0):
    """PPO surrogate and forward KL written out in torch (for autograd)."""
    lp, old, tq = x.student.token_logprob, x.old_logprob, x.teacher.token_logprob
    adv = tq - old
    r = torch.exp(lp - old)
    pg = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * 3.0), pg)
    ls = x.student.support_logits - x.student.lse.unsqueeze(-1)
    lt = x.teacher.support_logits - x.teacher.lse.unsqueeze(-1)
    fkl = (lt.exp() * (lt - ls)).sum(-1)
    if name == "entropy_aware":
        return pg + alpha * (x.teacher.entropy > tau).double() * fkl
    w = torch.clamp(torch.exp(adv), max=1.0)
    return w * pg + (1 - w) * fkl


@pytest.mark.parametrize("name", ["entropy_aware", "trust_region"])
def test_gradients_equal_autograd_of_the_plain_formula(name):
    x = inputs(8, ratio_one=False)
    got = loss_of(name, x)
    want = reference_torch(name, x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    wts = torch.rand(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = (x.student.token_logprob, x.student.support_logits)
    g = torch.autograd.grad((got * wts).sum(), leaves, retain_graph=True)
    r = torch.autograd.grad((want * wts).sum(), leaves)
    for a, b in zip(g, r):
        assert b.abs().max() > 1e-3
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
