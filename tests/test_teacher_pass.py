"""The teacher is scored in one pass of its head: every quantity the supports and losses read comes
from it, checked against the teacher's plain full logits; a support holding ids the pass did not
read gets them from a second pass, with the same values. The lean full-vocabulary path equals the
naive one for the full JSD too."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, demo_cfg
from test_lean_head import compare

from opdlm.builder import build_run
from opdlm.module import OPDModule
from opdlm.plugin_api import SupportSelector
from opdlm.types import Support

SUPPORTS = {
    "teacher_topk": ["support.name=teacher_topk", "support.k=4"],
    "student_topk": ["support.name=student_topk", "support.k=4"],
    "teacher_topk_plus_sampled": ["support.name=teacher_topk_plus_sampled", "support.k=3"],
    "teacher_top_p": ["support.name=teacher_top_p", "support.max_k=6"],
    "union": ["support={name: union, first: {name: teacher_topk, k: 3}, second: {name: student_topk, k: 3}}"],
}


def setup(*extra: str):
    torch.manual_seed(0)
    cfg = demo_cfg(*TINY, "sampler.max_new_tokens=10", "sampler.n=2", *extra)
    built = build_run(cfg)
    module = OPDModule(cfg, built=built)
    tok = built.student.tokenizer
    ex = built.task.examples("train")[:3]
    ro = built.sampler.sample(module.student, tok, [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex], ex)
    return module, built, ro


def full_teacher_logits(module: OPDModule, view) -> torch.Tensor:
    """The teacher's logits at the scored positions from its plain forward (no opdlm head code)."""
    with torch.no_grad():
        out = module.teacher(input_ids=view.input_ids, attention_mask=view.attention_mask,
                             position_ids=view.position_ids).logits
    z = out.gather(1, view.pred_columns.clamp_min(0).unsqueeze(-1).expand(-1, -1, out.shape[-1]))
    return z[..., : module.run.teacher.n_ids] / module.scorer().temperature


def prepare_counting_head_calls(module: OPDModule, ro):
    """module.prepare(ro), and how many blocks of logits of the teacher's output head were made."""
    import opdlm.ops.head as head_ops
    real = head_ops._logits
    calls = []

    def counting(feats, lm_head, *a, **k):
        if lm_head is module.teacher.get_output_embeddings():
            calls.append(1)
        return real(feats, lm_head, *a, **k)
    head_ops._logits = counting
    try:
        return module.prepare(ro), len(calls)
    finally:
        head_ops._logits = real


@pytest.mark.parametrize("block", [None, 5])
@pytest.mark.parametrize("name", list(SUPPORTS))
def test_one_head_pass_gives_every_teacher_quantity(name, block):
    module, built, ro = setup(*SUPPORTS[name], *([f"stages.opd.teacher_head_block={block}"] if block else []))
    (view, teacher, support, mask), calls = prepare_counting_head_calls(module, ro)
    n = ro.targets.numel()
    assert calls == (-(-n // block) if block else 1)  # one pass over the teacher's head, block by block
    z = full_teacher_logits(module, view)
    lse = torch.logsumexp(z, -1)
    ids = support.teacher_ids if support.teacher_ids is not None else support.ids
    m = support.valid & ro.response_mask.unsqueeze(-1)
    torch.testing.assert_close(teacher.support_logits[m], z.gather(-1, ids)[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.lse, lse, atol=1e-5, rtol=1e-5)
    logp = z - lse.unsqueeze(-1)
    torch.testing.assert_close(teacher.token_logprob, logp.gather(-1, view.targets.clamp_min(0).unsqueeze(-1)).squeeze(-1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.entropy, -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=1e-5)


class OddIds(SupportSelector):
    """A support of fixed ids (5 and 6), which the teacher's pass reads only where they happen to be
    in its top-2 or the sampled token."""

    teacher_k = 2

    @property
    def size(self) -> int:
        return 2

    def select(self, teacher, student, rollout, view=None) -> Support:
        B, T = rollout.targets.shape
        ids = torch.tensor([5, 6]).expand(B, T, 2)
        return Support(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool))


def test_ids_outside_the_pass_cost_a_second_pass_with_the_same_values():
    module, built, ro = setup("support.k=2")
    module.run.only.support = OddIds()
    (view, teacher, support, mask), calls = prepare_counting_head_calls(module, ro)
    assert calls == 2
    z = full_teacher_logits(module, view)
    torch.testing.assert_close(teacher.support_logits, z.gather(-1, support.ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_lean_full_vocabulary_jsd_equals_naive(beta):
    compare({"name": "jsd", "beta": beta, "full": True}, [])


@pytest.mark.parametrize("V,k,group", [(4096, 8, 128), (5000, 8, 128), (1000, 3, 16), (40, 4, 128)])
def test_grouped_topk_equals_torch_topk(V, k, group):
    """The one-pass top-k (group maxima first) gives torch.topk's values and ids, also when the
    last group is partial and when there are too few groups to use them."""
    from opdlm.ops.head import grouped_topk
    g = torch.Generator().manual_seed(V)
    z = torch.randn(6, V, generator=g, dtype=torch.float64) * 4
    z[0, -3:] = 50.0 + torch.arange(3)  # the largest ids in the partial last group
    v, i = grouped_topk(z, k, group)
    want_v, want_i = z.topk(k, dim=-1)
    assert torch.equal(v, want_v) and torch.equal(i, want_i)
