"""opdlm.ops.head.head_scores against a direct full-vocabulary computation written out here.

head_scores computes in float32 (it calls .float() on the logits), so the references below are
float64 computations from the same parameters and the tolerances are float32 ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from opdlm.ops.head import head_scores

B, T, H, V, K = 2, 5, 8, 11, 4


def _setup(seed: int = 0, extra_rows: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(H, V + extra_rows)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V + extra_rows, H, generator=g))
        head.bias.copy_(torch.randn(V + extra_rows, generator=g))
        if extra_rows:
            head.bias[V:] = 50.0  # padding rows that would dominate everything if they leaked in
    feats = torch.randn(B, T, H, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    support = torch.randint(0, V, (B, T, K), generator=g)
    return head, feats, targets, support


def _reference(feats, weight, bias, temperature=1.0, rows=V):
    """Direct float64 computation: logits, log-softmax by max-shift, entropy, all written out."""
    z = (feats.double() @ weight.double()[:rows].T + bias.double()[:rows]) / temperature
    m = z.max(-1, keepdim=True).values
    lse = m.squeeze(-1) + torch.log(torch.exp(z - m).sum(-1))
    logp = z - lse.unsqueeze(-1)
    ent = -(torch.exp(logp) * logp).sum(-1)
    return z, lse, logp, ent


def _check_against_reference(s, z, lse, logp, ent, targets, support, topk):
    f = dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s.lse.double(), lse, **f)
    torch.testing.assert_close(s.token_logprob.double(), logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), **f)
    torch.testing.assert_close(s.support_logits.double(), z.gather(-1, support), **f)
    torch.testing.assert_close(s.entropy.double(), ent, **f)
    assert s.support_logprobs().shape == support.shape
    torch.testing.assert_close(s.support_logprobs().double(), logp.gather(-1, support), **f)
    order = torch.argsort(z, dim=-1, descending=True)[..., :topk]
    assert torch.equal(s.topk_ids, order)
    torch.testing.assert_close(s.topk_logits.double(), z.gather(-1, order), **f)


@pytest.mark.parametrize("grad", [False, True], ids=["one-pass", "autograd"])
@pytest.mark.parametrize("chunk", [None, 3, 1, 100])
def test_matches_direct_computation(chunk, grad):
    head, feats, targets, support = _setup(0)
    with torch.set_grad_enabled(grad):
        s = head_scores(feats, head, targets, support_ids=support, topk=3, block=chunk)
    assert s.token_logprob.shape == (B, T) and s.lse.shape == (B, T) and s.entropy.shape == (B, T)
    assert s.support_logits.shape == (B, T, K) and s.topk_ids.shape == (B, T, 3)
    _check_against_reference(s, *_reference(feats, head.weight, head.bias), targets, support, 3)


def test_chunked_equals_unchunked():
    head, feats, targets, support = _setup(1)
    a = head_scores(feats, head, targets, support_ids=support, topk=4)
    b = head_scores(feats, head, targets, support_ids=support, topk=4, block=3)  # 10 = 3+3+3+1
    for name in ("token_logprob", "lse", "support_logits", "topk_logits", "entropy"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-6, rtol=1e-6)
    assert torch.equal(a.topk_ids, b.topk_ids)
    # and the gradients through both are the same
    ga = torch.autograd.grad((a.token_logprob.sum() + a.support_logits.sum() + a.entropy.sum()), head.weight)
    gb = torch.autograd.grad((b.token_logprob.sum() + b.support_logits.sum() + b.entropy.sum()), head.weight)
    torch.testing.assert_close(ga[0], gb[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_logits(temperature):
    head, feats, targets, support = _setup(2)
    with torch.no_grad():
        s = head_scores(feats, head, targets, support_ids=support, topk=2, temperature=temperature, block=4)
        plain = head_scores(feats, head, targets, support_ids=support, topk=2)
    ref = _reference(feats, head.weight, head.bias, temperature=temperature)
    _check_against_reference(s, *ref, targets, support, 2)
    torch.testing.assert_close(s.support_logits, plain.support_logits / temperature, atol=1e-5, rtol=1e-6)
    assert not torch.allclose(s.lse, plain.lse, atol=1e-3)


def test_vocab_rows_excludes_trailing_rows():
    head, feats, targets, support = _setup(3, extra_rows=3)
    with torch.no_grad():
        s = head_scores(feats, head, targets, support_ids=support, topk=V, vocab_rows=V, block=3)
        leaky = head_scores(feats, head, targets, support_ids=support, topk=V)
    _check_against_reference(s, *_reference(feats, head.weight, head.bias, rows=V), targets, support, V)
    assert (s.topk_ids < V).all()
    # the padding rows really would have mattered
    assert (leaky.topk_ids[..., 0] >= V).all()
    assert (leaky.lse - s.lse).min() > 10


def test_logits_path_without_head():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(B, T, V, generator=g) * 3
    targets = torch.randint(0, V, (B, T), generator=g)
    support = torch.randint(0, V, (B, T, K), generator=g)
    s = head_scores(logits, None, targets, support_ids=support, topk=3, temperature=1.5, block=4)
    z = logits.double() / 1.5
    m = z.max(-1, keepdim=True).values
    lse = m.squeeze(-1) + torch.log(torch.exp(z - m).sum(-1))
    logp = z - lse.unsqueeze(-1)
    _check_against_reference(s, z, lse, logp, -(logp.exp() * logp).sum(-1), targets, support, 3)


def test_optional_outputs():
    head, feats, targets, _ = _setup(5)
    with torch.no_grad():
        s = head_scores(feats, head, targets, entropy=False)
    assert s.support_logits is None and s.topk_ids is None and s.topk_logits is None and s.entropy is None
    assert not s.lse.requires_grad
    # negative targets (no token) do not break anything
    t2 = targets.clone()
    t2[0, 1] = -1
    with torch.no_grad():
        s2 = head_scores(feats, head, t2)
    assert torch.isfinite(s2.token_logprob).all()
    torch.testing.assert_close(s2.token_logprob[1], s.token_logprob[1])


@pytest.mark.parametrize("chunk", [None, 3])
def test_gradient_matches_autograd_of_direct_computation(chunk):
    head, feats, targets, support = _setup(6)
    g = torch.Generator().manual_seed(60)
    w_tok, w_lse = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    w_sup = torch.randn(B, T, K, generator=g)
    feats = feats.requires_grad_(True)
    s = head_scores(feats, head, targets, support_ids=support, temperature=1.3, block=chunk)
    assert not s.entropy.requires_grad  # a diagnostic: no graph is kept for it
    obj = (s.token_logprob * w_tok).sum() + (s.lse * w_lse).sum() + (s.support_logits * w_sup).sum()
    g_feats, g_w, g_b = torch.autograd.grad(obj, (feats, head.weight, head.bias))

    f64 = feats.detach().double().requires_grad_(True)
    w64 = head.weight.detach().double().requires_grad_(True)
    b64 = head.bias.detach().double().requires_grad_(True)
    z, lse, logp, ent = _reference(f64, w64, b64, temperature=1.3)
    ref = ((logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * w_tok.double()).sum()
           + (lse * w_lse.double()).sum() + (z.gather(-1, support) * w_sup.double()).sum())
    torch.testing.assert_close(s.entropy.double(), ent.detach(), atol=1e-4, rtol=1e-5)
    r_feats, r_w, r_b = torch.autograd.grad(ref, (f64, w64, b64))
    torch.testing.assert_close(obj.double(), ref.detach(), atol=1e-4, rtol=1e-5)
    for got, want in ((g_feats, r_feats), (g_w, r_w), (g_b, r_b)):
        assert want.abs().max() > 1e-2
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("with_head", [True, False])
def test_one_pass_equals_autograd_path_with_buckets_rows_and_temperature(with_head):
    """The no-gradient pass (one exp per chunk, max from the top-k) gives the values of the
    differentiable path, first-byte buckets, padding rows and temperature included."""
    head, feats, targets, support = _setup(3, extra_rows=2)
    buckets = torch.randint(0, 5, (V + 2,), generator=torch.Generator().manual_seed(1))
    kw = dict(support_ids=support, topk=3, temperature=0.7, vocab_rows=V, block=4, buckets=buckets, n_buckets=6)
    x = feats if with_head else head(feats).detach()
    h = head if with_head else None
    a = head_scores(x.requires_grad_(True) if not with_head else x, h, targets, **kw)  # autograd path
    with torch.no_grad():
        b = head_scores(x, h, targets, **kw)
    for name in ("token_logprob", "lse", "support_logits", "topk_logits", "entropy", "byte_logprobs"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name).detach(), atol=1e-5, rtol=1e-5, msg=name)
    assert torch.equal(a.topk_ids, b.topk_ids)
    assert torch.isneginf(b.byte_logprobs[..., 5]).all()  # an empty bucket


def test_lookup_logits_reads_candidates():
    from opdlm.ops.head import lookup_logits
    cand = torch.tensor([[[5, 2, 9, 2]]])
    logits = torch.tensor([[[0.5, 0.2, 0.9, 0.3]]])
    got, found = lookup_logits(torch.tensor([[[2, 9, 7]]]), cand, logits)
    assert found.tolist() == [[[True, True, False]]]
    torch.testing.assert_close(got, torch.tensor([[[0.2, 0.9, 0.0]]]))  # the first candidate holding the id
