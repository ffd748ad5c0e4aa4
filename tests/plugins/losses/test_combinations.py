"""weighted_sum against the weighted children computed by hand; full-vocabulary reverse_kl and
forward_kl against plain KL formulas."""

from __future__ import annotations

import plugin_testkit as kit
import pytest
import torch

from opdlm.errors import ConfigError
from opdlm.registry import LOSSES, SUPPORTS
from opdlm.types import Scores, Support

B, T, V = 2, 4, 6


def inputs(seed: int, K: int = V):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, T, V, generator=g, dtype=torch.float64).requires_grad_(True)
    zt = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    ids = torch.arange(V).expand(B, T, V)[..., :K]

    def sc(z):
        lse = torch.logsumexp(z, -1)
        return Scores(token_logprob=z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse, lse=lse,
                      support_logits=z.gather(-1, ids))

    x = kit.build_loss_inputs(student=sc(zs), teacher=sc(zt), targets=targets,
                              support=Support(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool)))
    old = x.student.token_logprob.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return x.__class__(**{**x.__dict__, "old_logprob": old}), zs, zt


def test_weighted_sum_is_the_weighted_sum_of_its_terms():
    x, zs, zt = inputs(1)
    node = {"name": "weighted_sum", "terms": [{"name": "sampled_token", "weight": 1.0},
                                               {"name": "forward_kl", "full": False, "weight": 0.5}]}
    got = LOSSES.build(node).compute(x)
    # independent: PPO surrogate and forward KL written out here
    adv = x.teacher.token_logprob - x.old_logprob
    ratio = torch.exp(x.student.token_logprob - x.old_logprob)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * 3.0), pg)
    lp, lq = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    fkl = (lq.exp() * (lq - lp)).sum(-1)
    torch.testing.assert_close(got.token_loss, pg + 0.5 * fkl, atol=1e-12, rtol=1e-10)
    assert set(got.stats) >= {"0_sampled_token/loss", "1_forward_kl/loss", "0_sampled_token/clip_frac"}
    (g,) = torch.autograd.grad(got.token_loss.sum(), zs, retain_graph=True)
    (want,) = torch.autograd.grad((pg + 0.5 * fkl).sum(), zs)
    torch.testing.assert_close(g, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name,formula", [("reverse_kl", "reverse"), ("forward_kl", "forward")])
def test_full_vocabulary_kls(name, formula):
    x, zs, zt = inputs(2)
    loss = LOSSES.build({"name": name})
    assert loss.reads.vocabulary == "full"
    lp, lq = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    want = (lp.exp() * (lp - lq)).sum(-1) if formula == "reverse" else (lq.exp() * (lq - lp)).sum(-1)
    torch.testing.assert_close(loss.compute(x).token_loss, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("node,msg", [
    ({"name": "weighted_sum"}, r"^loss\.terms: weighted_sum needs at least one loss node$"),
    ({"name": "weighted_sum", "terms": []}, r"^loss\.terms: weighted_sum needs at least one loss node$"),
    ({"name": "weighted_sum", "terms": [{"name": "lsm", "weight": -0.5}]}, r"^loss\.terms\.0\.weight: must be a number >= 0, got -0.5$"),
    ({"name": "weighted_sum", "terms": [{"name": "jsd", "beta": 2.0}]}, r"^loss\.terms\.0\.beta: must be in \[0, 1\], got 2.0$"),
    ({"name": "weighted_sum", "terms": [{"name": "reverse_kl"}, {"name": "lsm"}]}, r"^loss\.terms\.1\.name: full-vocabulary losses"),
])
def test_weighted_sum_bad_options(node, msg):
    with pytest.raises(ConfigError, match=msg):
        LOSSES.build(node, "loss")


def test_weighted_sum_checks_its_terms_against_the_support():
    loss = LOSSES.build({"name": "weighted_sum", "terms": [{"name": "sampled_token"}, {"name": "lsm"}]})
    with pytest.raises(ConfigError, match="loss 'lsm' needs a support of at least 2 tokens"):
        loss.check_support(SUPPORTS.build({"name": "sampled_token"}), "support")


def test_jsd_full_asks_for_the_whole_vocabulary_and_then_is_the_full_jsd():
    x, zs, zt = inputs(3)  # the fixture's support already covers all V ids
    loss = LOSSES.build({"name": "jsd", "beta": 0.5, "full": True})
    assert loss.reads.vocabulary == "full" and LOSSES.build({"name": "jsd"}).reads.vocabulary == "support"
    p, q = torch.softmax(zs, -1), torch.softmax(zt, -1)
    m = 0.5 * p + 0.5 * q
    want = 0.5 * (q * (q / m).log()).sum(-1) + 0.5 * (p * (p / m).log()).sum(-1)
    torch.testing.assert_close(loss.compute(x).token_loss, want, atol=1e-12, rtol=1e-10)
