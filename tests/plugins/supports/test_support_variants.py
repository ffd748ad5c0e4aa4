"""student_topk, teacher_topk_plus_sampled, teacher_top_p and union: shapes, masks, the sampled
token always in *_plus_sampled, nucleus sizes within [min_k, max_k], no duplicates in unions."""

from __future__ import annotations

import plugin_testkit as kit
import pytest
import torch

from opdlm.errors import ConfigError
from opdlm.registry import SUPPORTS
from opdlm.types import Scores

B, T, V = 3, 5, 12


def model_scores(seed: int, k: int = V, scale: float = 2.0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g) * scale
    v, i = z.topk(k, dim=-1)
    return Scores(token_logprob=torch.zeros(B, T), lse=torch.logsumexp(z, -1), topk_ids=i, topk_logits=v)


def rollout(seed: int):
    g = torch.Generator().manual_seed(seed)
    return kit.build_rollout(torch.randint(0, V, (B, T), generator=g))


def test_student_topk_takes_the_students_ids():
    s = SUPPORTS.build({"name": "student_topk", "k": 3})
    student, teacher = model_scores(1), model_scores(2)
    sup = s.select(teacher, student, rollout(0))
    assert s.student_k == 3 and s.teacher_k == 0
    assert torch.equal(sup.ids, student.topk_ids[..., :3]) and sup.valid.all()


def test_plus_sampled_always_contains_the_sampled_token_once():
    s = SUPPORTS.build({"name": "teacher_topk_plus_sampled", "k": 4})
    teacher, ro = model_scores(3), rollout(4)
    sup = s.select(teacher, None, ro)
    assert sup.ids.shape == (B, T, 5)
    for b in range(B):
        for t in range(T):
            valid_ids = [i for i, ok in zip(sup.ids[b, t].tolist(), sup.valid[b, t].tolist()) if ok]
            y = ro.targets[b, t].item()
            assert valid_ids.count(y) == 1
            assert len(valid_ids) == len(set(valid_ids))
            assert set(valid_ids) == set(teacher.topk_ids[b, t, :4].tolist()) | {y}
    # both cases occur in this draw: sampled inside and outside the top 4
    assert sup.valid[..., 4].any() and (~sup.valid[..., 4]).any()


@pytest.mark.parametrize("p,min_k,max_k", [(0.5, 1, 12), (0.9, 2, 6), (0.99, 3, 4), (1.0, 1, 12)])
def test_nucleus_is_the_smallest_prefix_reaching_p_within_bounds(p, min_k, max_k):
    s = SUPPORTS.build({"name": "teacher_top_p", "p": p, "min_k": min_k, "max_k": max_k})
    teacher = model_scores(5)
    sup = s.select(teacher, None, rollout(0))
    assert sup.ids.shape == (B, T, max_k)
    for b in range(B):
        for t in range(T):
            probs = (teacher.topk_logits[b, t] - teacher.lse[b, t]).exp().tolist()
            n, mass = 0, 0.0
            while n < V and mass < p:  # brute force: add tokens until the mass reaches p
                mass += probs[n]
                n += 1
            want = min(max(n, min_k), max_k)
            got = sup.valid[b, t].tolist()
            assert got == [True] * want + [False] * (max_k - want)
    sizes = sup.valid.sum(-1)
    assert sizes.min() >= min_k and sizes.max() <= max_k


def test_union_removes_duplicates_and_keeps_everything_else():
    s = SUPPORTS.build({"name": "union", "first": {"name": "teacher_topk", "k": 4},
                        "second": {"name": "student_topk", "k": 4}})
    assert s.teacher_k == 4 and s.student_k == 4 and s.size == 8
    teacher, student = model_scores(6), model_scores(7)
    sup = s.select(teacher, student, rollout(0))
    for b in range(B):
        for t in range(T):
            valid_ids = [i for i, ok in zip(sup.ids[b, t].tolist(), sup.valid[b, t].tolist()) if ok]
            assert len(valid_ids) == len(set(valid_ids))
            assert set(valid_ids) == set(teacher.topk_ids[b, t, :4].tolist()) | set(student.topk_ids[b, t, :4].tolist())


@pytest.mark.parametrize("node,msg", [
    ({"name": "student_topk", "k": 0}, r"^support\.k: must be >= 1, got 0$"),
    ({"name": "teacher_topk_plus_sampled", "k": 0}, r"^support\.k: must be >= 1, got 0$"),
    ({"name": "teacher_top_p", "p": 0.0}, r"^support\.p: must be in \(0, 1\], got 0.0$"),
    ({"name": "teacher_top_p", "min_k": 5, "max_k": 4}, r"^support\.max_k: must be >= min_k \(5\), got 4$"),
    ({"name": "union", "first": {"name": "teacher_topk", "k": 0}, "second": {"name": "sampled_token"}},
     r"^support\.first\.k: must be >= 1, got 0$"),
    ({"name": "union", "first": {"name": "teacher_topk"}}, r"^support\.first: union needs two support nodes"),
])
def test_bad_options(node, msg):
    with pytest.raises(ConfigError, match=msg):
        SUPPORTS.build(node, "support")


def test_k_larger_than_the_vocabulary_fails_at_bind():
    ctx = kit.make_ctx()
    for node in ({"name": "student_topk", "k": 10_000}, {"name": "teacher_topk_plus_sampled", "k": 10_000},
                 {"name": "teacher_top_p", "max_k": 10_000}):
        with pytest.raises(ConfigError, match="is larger than the"):
            SUPPORTS.build(node, "support").bind(ctx)
