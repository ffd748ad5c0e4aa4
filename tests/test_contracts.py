"""Contract tests parametrised over every registered plugin of each kind: a new plugin is tested
the day it lands. Real tiny models (built in memory) produce the rollouts and scores."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, demo_cfg

from opdlm.builder import build_run
from opdlm.module import OPDModule
from opdlm.ops.batch import full_support
from opdlm.plugin_api import Context
from opdlm.registry import ALIGNERS, LOSSES, MASKERS, SAMPLERS, SUPPORTS, TASKS
from opdlm.types import LossInputs, Scores

#: options for plugins whose defaults do not fit the fixture (a ~27-id character tokenizer, no data
#: file); "{jsonl}" is replaced by a generated file
FIXTURE_OPTIONS = {
    "task": {"jsonl": {"path": "{jsonl}"}},
    "support": {"topk": {"k": 4}, "mapped_topk": {"k": 3},
                "teacher_top_p": {"max_k": 4},
                "union": {"first": {"name": "teacher_topk", "k": 2}, "second": {"name": "student_topk", "k": 2}}},
    "sampler": {"top_p": {"max_new_tokens": 12}},
    "loss": {"weighted_sum": {"terms": [{"name": "sampled_token", "weight": 1.0}, {"name": "lsm", "weight": 0.5}]}},
    "masker": {"special_tokens": {"tokens": ["<think>", "<|im_end|>"]}},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.manual_seed(0)
    cfg = demo_cfg(*TINY, "support.k=4", "sampler.max_new_tokens=10", "sampler.n=2")
    built = build_run(cfg)
    module = OPDModule(cfg, built=built)
    ex = built.task.examples("train")[:3]
    tok = built.student.tokenizer
    prompts = [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex]
    rollout = built.sampler.sample(module.student, tok, prompts, ex)
    view = built.aligner.align(rollout)
    teacher = module.scorer().teacher_scores(module.teacher, view)
    jsonl = tmp_path_factory.mktemp("data") / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(20)))
    return {"cfg": cfg, "built": built, "module": module, "rollout": rollout, "view": view,
            "teacher": teacher, "prompts": prompts, "examples": ex, "jsonl": str(jsonl)}


def build(kind_reg, name, world, key):
    node = {"name": name}
    for k, v in FIXTURE_OPTIONS.get(kind_reg.kind, {}).get(name, {}).items():
        node[k] = world["jsonl"] if v == "{jsonl}" else v
    plugin = kind_reg.build(node, key)
    built = world["built"]
    plugin.bind(Context(built.student.tokenizer, built.teacher.tokenizer, built.student.vocab_rows,
                        built.teacher.vocab_rows, built.task))
    return plugin


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_contract(name, world):
    if SAMPLERS.get(name).multi_turn:
        pytest.skip("multi-turn samplers play interactive tasks: tests/plugins/samplers/test_multi_turn.py")
    if name == "vllm":  # (the optional package; its attention kernels need a larger head than the fixture's)
        pytest.skip("the vllm sampler's contract runs on models it supports: tests/plugins/samplers/test_vllm.py")
    s = build(SAMPLERS, name, world, "sampler")
    built = world["built"]
    ro = s.sample(world["module"].student, built.student.tokenizer, world["prompts"], world["examples"], n=2)
    B, L = ro.input_ids.shape
    T = L - ro.prompt_len
    assert B == 2 * len(world["prompts"])
    assert ro.response_mask.shape == ro.behaviour_logprobs.shape == (B, T)
    assert ro.attention_mask.shape == ro.position_ids.shape == (B, L)
    # the mask is a prefix: no generated token counts after a masked one
    m = ro.response_mask.long()
    assert torch.all(m[:, 1:] <= m[:, :-1])
    assert torch.all(ro.behaviour_logprobs[ro.response_mask] <= 1e-6)
    assert torch.isfinite(ro.behaviour_logprobs).all()
    eos = built.student.tokenizer.eos_token_id
    assert torch.all(ro.truncated == ~(ro.targets.eq(eos) & ro.response_mask).any(-1))
    assert len(ro.examples) == len(ro.texts) == B
    g = s.sample(world["module"].student, built.student.tokenizer, world["prompts"], world["examples"], greedy=True, n=1)
    g2 = s.sample(world["module"].student, built.student.tokenizer, world["prompts"], world["examples"], greedy=True, n=1)
    assert torch.equal(g.input_ids, g2.input_ids), "greedy decoding is deterministic"


@pytest.mark.parametrize("name", ALIGNERS.names())
def test_aligner_contract(name, world):
    a = build(ALIGNERS, name, world, "aligner")
    ro = world["rollout"]
    built = world["built"]
    t_prompts = [built.teacher.tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] for ex in ro.examples]
    v = a.align(ro, t_prompts if a.uses_teacher_prompt else None)
    B, T = ro.response_mask.shape
    assert v.pred_columns.shape == v.targets.shape == v.aligned.shape == (B, T)
    assert v.aligned.dtype == torch.bool
    starts = v.positions("start")
    assert torch.all(v.pred_columns[starts] >= 0)
    assert torch.all(v.pred_columns[starts] < v.input_ids.shape[1])
    assert not (v.positions("token") & ~starts).any() and not (starts & ~v.aligned).any()
    assert not (v.aligned & ~ro.response_mask).any()
    # one tokenizer: every control token is spelled alike on both sides, so every response token
    # is aligned (the random fixture student samples <pad> and <unk> too)
    assert torch.equal(v.aligned, ro.response_mask)


@pytest.mark.parametrize("name", SUPPORTS.names())
def test_support_contract(name, world):
    s = build(SUPPORTS, name, world, "support")
    ro = world["rollout"]
    teacher = world["teacher"]
    if s.teacher_k > teacher.topk_ids.shape[-1]:
        pytest.skip("fixture teacher top-k too small")
    student = world["module"].score_student(ro, None, topk=s.student_k) if s.student_k else None
    view = world["view"]
    sup = s.select(teacher, student, ro, view)
    B, T = ro.response_mask.shape
    assert sup.ids.shape[:2] == (B, T) and sup.ids.shape == sup.valid.shape
    assert sup.ids.shape[-1] <= s.size
    assert sup.valid.dtype == torch.bool and sup.valid.any(-1)[view.positions("token")].all()
    if sup.teacher_ids is not None:
        assert sup.teacher_ids.shape == sup.ids.shape
    assert sup.ids.min() >= 0 and sup.ids.max() < world["built"].teacher.vocab_rows


@pytest.mark.parametrize("name", MASKERS.names())
def test_masker_contract(name, world):
    m = build(MASKERS, name, world, "masker")
    ro = world["rollout"]
    out = m.mask(ro, world["view"])
    assert out.shape == ro.response_mask.shape and out.dtype == torch.bool


@pytest.mark.parametrize("name", LOSSES.names())
def test_loss_contract(name, world):
    loss = build(LOSSES, name, world, "loss")
    ro, module = world["rollout"], world["module"]
    sup = SUPPORTS.build({"name": "teacher_topk", "k": 4}).select(world["teacher"], None, ro)
    if loss.reads.vocabulary == "full":
        sup = full_support(ro.targets, len(world["built"].student.tokenizer))
    loss.check_support(SUPPORTS.build({"name": "teacher_topk", "k": 4}), "support")
    module.student.zero_grad()
    student = module.score_student(ro, sup.ids, first_byte=loss.reads.has("student", "byte_logprobs"))
    t = world["teacher"]
    with torch.no_grad():
        t_sup = module.score_student(ro, sup.ids, first_byte=loss.reads.has("student", "byte_logprobs"))  # any fixed values will do
    t_bytes = None
    if t_sup.byte_logprobs is not None:
        t_bytes = torch.log_softmax(t_sup.byte_logprobs + 0.3 * torch.randn_like(t_sup.byte_logprobs), -1)
    teacher = Scores(token_logprob=t.token_logprob, lse=t.lse, support_logits=t_sup.support_logits.detach() + 0.3,
                     topk_ids=t.topk_ids, topk_logits=t.topk_logits, entropy=t.entropy,
                     chunk_logprob=t.token_logprob, byte_logprobs=t_bytes)
    mask = ro.response_mask
    out = loss.compute(LossInputs(student=student, teacher=teacher, support=sup,
                                  old_logprob=student.token_logprob.detach(), mask=mask, rollout=ro,
                                  view=world["view"]))
    assert out.token_loss.shape == mask.shape
    assert torch.isfinite(out.token_loss[mask]).all()
    total = (out.token_loss * mask).sum() / mask.sum()
    total.backward()
    grads = [p.grad for p in module.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for v in out.stats.values():
        assert v.dim() == 0 and torch.isfinite(v)


@pytest.mark.parametrize("name", TASKS.names())
def test_task_contract(name, world):
    if TASKS.get(name).interactive:
        pytest.skip("interactive tasks are played: tests/plugins/samplers/test_multi_turn.py")
    task = build(TASKS, name, world, "task")
    for split in ("train", "val", "test"):
        assert len(task.examples(split)) > 0
    ex = task.examples("test")[0]
    assert task.verify(f"\\boxed{{{ex.answer}}}", ex)
    assert not task.verify("no answer here", ex)
    assert "".join(task.corpus())
