"""Support selectors: teacher top-K and the sampled token."""

from __future__ import annotations

import plugin_testkit
import pytest
import torch

from opdlm.errors import ConfigError
from opdlm.registry import SUPPORTS
from opdlm.types import Scores

kit = plugin_testkit
make_rollout = kit.build_rollout
make_ctx = kit.make_ctx
char_tok = kit.char_tok()


def _teacher(topk_ids: torch.Tensor) -> Scores:
    B, T, _ = topk_ids.shape
    return Scores(token_logprob=torch.zeros(B, T), lse=torch.zeros(B, T), topk_ids=topk_ids,
                  topk_logits=-torch.arange(topk_ids.shape[-1], dtype=torch.float32).expand(B, T, -1))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_teacher_topk_takes_the_first_k(k):
    g = torch.Generator().manual_seed(k)
    B, T, kk = 2, 4, 5
    topk_ids = torch.stack([torch.stack([torch.randperm(30, generator=g)[:kk] for _ in range(T)]) for _ in range(B)])
    sel = SUPPORTS.build({"name": "teacher_topk", "k": k}, "support")
    assert sel.size == k and sel.teacher_k == k and sel.student_k == 0
    rollout = make_rollout(torch.randint(0, 30, (B, T), generator=g))
    sup = sel.select(_teacher(topk_ids), None, rollout)
    assert sup.ids.shape == (B, T, k) and sup.valid.shape == (B, T, k)
    assert sup.valid.dtype == torch.bool and sup.valid.all()
    for b in range(B):
        for t in range(T):
            assert sup.ids[b, t].tolist() == topk_ids[b, t].tolist()[:k]
    assert sup.size == k


@pytest.mark.parametrize("k", [0, -3])
def test_teacher_topk_rejects_k_below_one(k):
    with pytest.raises(ConfigError, match=r"^support\.k:"):
        SUPPORTS.build({"name": "teacher_topk", "k": k}, "support")


def test_teacher_topk_k_beyond_vocabulary_raises_at_bind():
    V = len(char_tok)
    ok = SUPPORTS.build({"name": "teacher_topk", "k": V}, "support")
    ok.bind(make_ctx())  # the whole vocabulary is allowed
    too_big = SUPPORTS.build({"name": "teacher_topk", "k": V + 1}, "support")
    with pytest.raises(ConfigError) as e:
        too_big.bind(make_ctx())
    assert str(e.value).startswith("k:") and str(V + 1) in str(e.value)


def test_teacher_topk_default_is_32():
    assert SUPPORTS.build({"name": "teacher_topk"}, "support").k == 32


def test_sampled_token_support_is_the_target():
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 50, (3, 6), generator=g)
    sel = SUPPORTS.build({"name": "sampled_token"}, "support")
    assert sel.size == 1 and sel.teacher_k == 0
    sup = sel.select(_teacher(torch.zeros(3, 6, 2, dtype=torch.long)), None, make_rollout(targets, prompt_len=3))
    assert sup.ids.shape == (3, 6, 1)
    assert torch.equal(sup.ids[..., 0], targets)
    assert sup.valid.dtype == torch.bool and sup.valid.all() and sup.valid.shape == (3, 6, 1)
