"""tail_pg (the paper's support + sampled-tail variants) by exact enumeration of the sampled token:
E_{y~π_b}[ℓ] is the full reverse KL, E[∇ℓ] is ∇(KL + π(S)) (or ∇KL with exact_gradient), and one
sample's value and gradient equal autograd of the formula written on the logits."""

from __future__ import annotations

import dataclasses

import plugin_testkit as kit
import pytest
import torch

from opdlm.registry import LOSSES
from opdlm.types import Scores, Support

V = 7


def case(seed: int):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
    zt = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
    zb = zs.detach() + 0.7 * torch.randn(V, generator=g, dtype=torch.float64)  # a behaviour policy ≠ π
    support = torch.randperm(V, generator=g)[:3]
    return zs, zt, zb, support


def per_sample_inputs(zs, zt, zb, support):
    """B = V rows, one position each: row y has sampled token y (all rows share the logits)."""
    zs_rows = zs.expand(V, 1, V)
    targets = torch.arange(V).reshape(V, 1)
    ids = support.expand(V, 1, -1)

    def sc(z):
        lse = torch.logsumexp(z, -1)
        return Scores(token_logprob=z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse, lse=lse,
                      support_logits=z.gather(-1, ids))

    x = kit.build_loss_inputs(student=sc(zs_rows), teacher=sc(zt.expand(V, 1, V)), targets=targets,
                              support=Support(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool)))
    behaviour = torch.log_softmax(zb, -1).reshape(V, 1)
    return dataclasses.replace(x, rollout=dataclasses.replace(x.rollout, behaviour_logprobs=behaviour))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("exact", [False, True])
def test_expectation_over_the_sampled_token_is_the_full_reverse_kl(seed, exact):
    zs, zt, zb, support = case(seed)
    zs = zs.clone().requires_grad_(True)
    loss = LOSSES.build({"name": "tail_pg", "exact_gradient": exact})
    per_y = loss.compute(per_sample_inputs(zs, zt, zb, support)).token_loss.reshape(V)
    pb = torch.softmax(zb, -1)
    expected = (pb * per_y).sum()
    lp, lq = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    kl = (lp.exp() * (lp - lq)).sum()
    torch.testing.assert_close(expected, kl, atol=1e-12, rtol=1e-10)  # value: unbiased
    (g,) = torch.autograd.grad(expected, zs)
    target = kl if exact else kl + lp.exp()[support].sum()  # E[∇ℓ] = ∇(KL + π(S)) without the fix
    (want,) = torch.autograd.grad(target, zs, retain_graph=True)
    torch.testing.assert_close(g, want, atol=1e-12, rtol=1e-10)
    if not exact:  # the bias is real: it is not the gradient of the KL alone
        (g_kl,) = torch.autograd.grad(kl, zs)
        assert (g - g_kl).abs().max() > 1e-3


def test_one_sample_matches_autograd_of_the_formula_on_logits_and_clipping():
    zs, zt, zb, support = case(7)
    zs = zs.clone().requires_grad_(True)
    x = per_sample_inputs(zs, zt, zb, support)
    outside = [y for y in range(V) if y not in support.tolist()][0]
    for max_weight in (None, 0.5):
        loss = LOSSES.build({"name": "tail_pg", "max_weight": max_weight})
        got = loss.compute(x).token_loss.reshape(V)[outside]
        (g,) = torch.autograd.grad(got, zs, retain_graph=True)
        # the formula, written on the logits
        lp, lq, lb = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1), torch.log_softmax(zb, -1)
        head = sum(lp[v].exp() * (lp[v] - lq[v]) for v in support.tolist())
        s = (lp[outside].detach() - lb[outside]).exp()
        s = s if max_weight is None else torch.clamp(s, max=max_weight)
        tail = s * torch.exp(lp[outside] - lp[outside].detach()) * (lp[outside] - lq[outside]).detach()
        want = head + tail
        (g_want,) = torch.autograd.grad(want, zs)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(g, g_want, atol=1e-12, rtol=1e-10)
    inside = support[0].item()  # a sampled token inside S adds no tail
    head_only = LOSSES.build({"name": "tail_pg"}).compute(x).token_loss.reshape(V)[inside]
    lp, lq = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    torch.testing.assert_close(head_only, sum(lp[v].exp() * (lp[v] - lq[v]) for v in support.tolist()))
