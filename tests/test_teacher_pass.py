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
    """module.prepare(ro), and how many times the teacher's output head ran."""
    calls = []
    hook = module.teacher.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:
        return module.prepare(ro), len(calls)
    finally:
        hook.remove()


@pytest.mark.parametrize("name", list(SUPPORTS))
def test_one_head_pass_gives_every_teacher_quantity(name):
    module, built, ro = setup(*SUPPORTS[name])
    (view, teacher, support, mask), calls = prepare_counting_head_calls(module, ro)
    assert calls == 1  # one pass (one chunk here) over the teacher's head
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
