"""The top-p filter against a brute-force nucleus in float64, and against transformers'
TopPLogitsWarper (the same rule written from the other end of the sorted vocabulary)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from opdlm.rollouts import top_p_filter


def brute_force_keep(row: torch.Tensor, p: float) -> tuple[set[int], float]:
    """The smallest set of most likely ids whose probability reaches p (float64), and the distance
    of the decision to the boundary (how close some prefix mass came to p)."""
    probs = torch.softmax(row.double(), -1)
    order = sorted(range(len(row)), key=lambda i: -float(probs[i]))
    keep, mass, margin = set(), 0.0, float("inf")
    for i in order:
        margin = min(margin, abs(mass - p))
        if mass >= p:
            break
        keep.add(i)
        mass += float(probs[i])
    return keep, margin


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.97])
def test_filter_keeps_the_brute_force_nucleus(p):
    g = torch.Generator().manual_seed(int(p * 100))
    x = torch.randn(300, 12, generator=g) * 2
    out = top_p_filter(x, p)
    checked = 0
    for r in range(x.shape[0]):
        keep, margin = brute_force_keep(x[r], p)
        if margin < 1e-5:  # a prefix mass within rounding of p: either answer is right
            continue
        assert set(torch.isfinite(out[r]).nonzero().flatten().tolist()) == keep
        assert torch.equal(out[r][list(keep)], x[r][list(keep)])  # kept logits are unchanged
        checked += 1
    assert checked > 250


def test_filter_matches_transformers_top_p_warper_away_from_the_boundary():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 40, generator=g) * 3
    for p in (0.3, 0.9):
        ours = torch.isinf(top_p_filter(x, p))
        theirs = torch.isinf(TopPLogitsWarper(p)(None, x))
        assert (ours != theirs).any(-1).float().mean() < 1e-3  # rows that differ sit on the boundary
        assert (ours == theirs).all(-1).float().mean() > 0.999


def test_top_p_one_and_the_most_likely_token():
    x = torch.tensor([[0.0, 5.0, -1.0], [1.0, 1.0, 1.0]])
    assert torch.equal(top_p_filter(x, 1.0), x)
    out = top_p_filter(x, 1e-6)
    assert torch.isfinite(out[0]).tolist() == [False, True, False]  # the most likely token always stays
    assert int(torch.isfinite(out[1]).sum()) == 1
