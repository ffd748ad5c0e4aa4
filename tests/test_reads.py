"""A loss declares what it reads (opdlm.reads): the engine computes exactly that, the config check
fails on a field the support cannot give or a loss reads without declaring it, weighted_sum reads
the union of its terms, and the old plugin names are aliases with preset options."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, demo_cfg

from opdlm.builder import build_run
from opdlm.cli import _list
from opdlm.errors import ConfigError, PluginError
from opdlm.module import OPDModule
from opdlm.reads import Reads, probe
from opdlm.registry import LOSSES


def tiny(*extra: str) -> dict:
    return demo_cfg(*TINY, *extra)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_passes_its_own_probe(name):
    """The probe hides every undeclared field: each built-in loss reads only what it declares."""
    node = {"name": name}
    if name == "weighted_sum":
        node["terms"] = [{"name": "sampled_token"}, {"name": "lsm"}, {"name": "first_byte"}]
    probe(LOSSES.build(node), 4)


def test_the_probe_hides_undeclared_fields_and_shows_declared_ones():
    seen = {}

    class Peek:
        plugin_name = "peek"
        reads = Reads.of("token_logprob", teacher=("entropy",))

        def compute(self, x):
            seen["entropy"] = x.teacher.entropy
            try:
                seen["leak"] = x.student.entropy
            except Exception as e:  # noqa: BLE001
                seen["hidden"] = repr(e)
            from opdlm.types import LossOutput
            return LossOutput(token_loss=x.student.token_logprob * 0)

    probe(Peek(), 4)
    assert isinstance(seen["entropy"], torch.Tensor) and seen["entropy"].shape == (2, 3)
    assert "student.entropy" in seen["hidden"]


def _write_plugin(folder, body: str) -> str:
    folder.mkdir(exist_ok=True)
    (folder / "forgetful.py").write_text(
        "from opdlm.plugin_api import Loss\nfrom opdlm.reads import Reads\nfrom opdlm.registry import LOSSES\n"
        "from opdlm.types import LossOutput\n\n\n"
        "@LOSSES.register('forgetful')\nclass Forgetful(Loss):\n" + body)
    return str(folder)


FORGETS_ENTROPY = ("    reads = Reads.of('token_logprob')\n\n"
                   "    def compute(self, inputs):\n"
                   "        gate = (inputs.teacher.entropy > 0.5).float()\n"
                   "        return LossOutput(token_loss=-gate * inputs.student.token_logprob)\n")


def test_a_loss_that_reads_an_undeclared_field_fails_at_check_with_its_name(tmp_path):
    from opdlm.registry import LOSSES as REG
    REG._entries.pop("forgetful", None)
    folder = _write_plugin(tmp_path / "p", FORGETS_ENTROPY)
    try:
        cfg = tiny(f"plugin_paths=[{folder}]", "loss.name=forgetful")
        with pytest.raises(ConfigError) as e:
            build_run(cfg)
        msg = str(e.value)
        assert msg.startswith("loss: 'forgetful' reads teacher.entropy but its `reads` declaration does not list it")
        assert "forgetful.py" in msg and "\n" not in msg
        # inside a weighted_sum the term is named by its key
        with pytest.raises(ConfigError, match=r"^loss\.terms\.1: 'forgetful' reads teacher\.entropy"):
            build_run(tiny(f"plugin_paths=[{folder}]",
                           "loss={name: weighted_sum, terms: [{name: sampled_token}, {name: forgetful}]}"))
    finally:
        REG._entries.pop("forgetful", None)


def test_a_loss_that_breaks_on_the_probe_is_a_plugin_error_naming_it(tmp_path):
    from opdlm.registry import LOSSES as REG
    REG._entries.pop("forgetful", None)
    folder = _write_plugin(tmp_path / "q", "    def compute(self, inputs):\n        return LossOutput(token_loss=1.0)\n")
    try:
        with pytest.raises(PluginError, match=r"loss 'forgetful' \(.*forgetful\.py\): compute\(\) returned token_loss float"):
            build_run(tiny(f"plugin_paths=[{folder}]", "loss.name=forgetful"))
    finally:
        REG._entries.pop("forgetful", None)


def test_a_field_the_support_cannot_give_is_a_config_error():
    class WantsTopK:
        plugin_name = "wants_topk"
        reads = Reads.of("token_logprob", teacher=("topk_logits",))

    from opdlm.reads import check_reads
    from opdlm.registry import ALIGNERS, SUPPORTS
    with pytest.raises(ConfigError, match=r"^support\.name: loss 'wants_topk' reads the teacher's own top-k"):
        check_reads(WantsTopK(), SUPPORTS.build({"name": "sampled_token"}), ALIGNERS.build({"name": "identity"}))
    check_reads(WantsTopK(), SUPPORTS.build({"name": "teacher_topk", "k": 4}), ALIGNERS.build({"name": "identity"}))


def test_reads_are_checked_when_declared():
    with pytest.raises(ValueError, match="chunk_logprob cannot be read on the student side"):
        Reads.of(student=("chunk_logprob",))
    with pytest.raises(ValueError, match="Reads.positions"):
        Reads(positions="everywhere")


def test_weighted_sum_reads_the_union_of_its_terms():
    terms = [{"name": "chunk_pg"}, {"name": "first_byte"}, {"name": "entropy_aware"}]
    ws = LOSSES.build({"name": "weighted_sum", "terms": terms})
    parts = [LOSSES.build(t) for t in terms]
    assert ws.reads.student == frozenset().union(*(p.reads.student for p in parts))
    assert ws.reads.teacher == frozenset().union(*(p.reads.teacher for p in parts))
    assert ws.reads.positions == "chunk"  # the widest of chunk, start, token
    assert LOSSES.build({"name": "weighted_sum", "terms": terms[1:]}).reads.positions == "start"


@pytest.mark.parametrize("loss,student_support,teacher_support,byte,chunk", [
    ("sampled_token", False, False, False, False),
    ("lsm", True, True, False, False),
    ("first_byte", False, False, True, False),
    ("chunk_pg", False, False, False, True),
])
def test_the_engine_computes_exactly_what_the_loss_reads(loss, student_support, teacher_support, byte, chunk):
    cfg = tiny(f"loss.name={loss}", "support.name=teacher_topk", "support.k=4", "maskers=[]")
    built = build_run(cfg)
    torch.manual_seed(0)
    module = OPDModule(cfg, built=built)
    tok = built.student.tokenizer
    ex = built.task.examples("train")[:2]
    ro = built.sampler.sample(module.student, tok, [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex],
                              ex, n=2)
    view, teacher, support, mask = module.prepare(ro)
    inputs, _, _ = module.loss_backward(ro, support, teacher, None, mask, view, mask.sum().float())
    assert (inputs.student.support_logits is not None) == student_support
    assert (inputs.teacher.support_logits is not None) == teacher_support
    assert (inputs.student.byte_logprobs is not None) == byte and (inputs.teacher.byte_logprobs is not None) == byte
    assert (inputs.teacher.chunk_logprob is not None) == chunk
    # what the step log reads is always there
    assert inputs.student.entropy is not None and inputs.teacher.entropy is not None


def test_old_names_are_aliases_with_preset_options():
    assert LOSSES.validate({"name": "lsm_unnormalised"}) == {"name": "reverse_kl", "full": False}
    assert LOSSES.validate({"name": "forward_kl_topk", "renormalise": True}) == {
        "name": "forward_kl", "full": False, "renormalise": True}
    assert LOSSES.build({"name": "lsm_unnormalised"}).reads.vocabulary == "support"
    assert LOSSES.build({"name": "reverse_kl"}).reads.vocabulary == "full"
    with pytest.raises(ConfigError, match=r"^loss\.full: 'lsm_unnormalised' is 'reverse_kl' with full: False"):
        LOSSES.validate({"name": "lsm_unnormalised", "full": True}, "loss")
    with pytest.raises(ConfigError, match=r"^loss\.renormalise: the full-vocabulary forward KL has nothing"):
        LOSSES.build({"name": "forward_kl", "renormalise": True}, "loss")
    listing = _list()
    assert "lsm_unnormalised" in listing and "= reverse_kl with full: false" in listing
    assert "= forward_kl with full: false" in listing


@pytest.mark.parametrize("old,new", [("chunk_size", "teacher_head_block"), ("head_chunk", "student_head_block")])
def test_renamed_keys_name_the_new_key(old, new):
    with pytest.raises(ConfigError) as e:
        demo_cfg(f"stages.opd.{old}=8")
    assert str(e.value).startswith(f"command line: stages.opd.{old}: unknown key (renamed: did you mean '{new}'?)")
