"""Config composition and the texts of config errors (pinned)."""

from __future__ import annotations

import textwrap

import pytest
from conftest import ROOT, demo_cfg

from opdlm.config import compose
from opdlm.errors import ConfigError
from opdlm.registry import LOSSES


def err(*overrides: str, confs: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        demo_cfg(*overrides, confs=confs)
    msg = str(e.value)
    assert "\n" not in msg, "config errors are one line"
    return msg


def test_unknown_plugin_name_says_did_you_mean_and_lists_choices():
    msg = err("loss.name=lsn")
    assert msg.startswith("command line: loss.name: unknown loss 'lsn' (did you mean 'lsm'?); choices: ")
    for name in LOSSES.names():
        assert name in msg


def test_unknown_masker_name_in_a_list_slot():
    msg = err("maskers.0.name=special_tokenz")
    assert msg.startswith("command line: maskers.0.name: unknown masker 'special_tokenz' (did you mean 'special_tokens'?)")


def test_a_removed_masker_says_why():
    msg = err("maskers.0.name=response")
    assert msg.startswith("command line: maskers.0.name: masker 'response' was removed: the engine itself keeps only")


def test_unknown_framework_key():
    assert err("stages.opd.step=3") == (
        "command line: stages.opd.step: unknown key (did you mean 'steps'?); valid keys here: steps, "
        "prompts_per_step, num_mini_batches, num_micro_batches, lr, weight_decay, betas, eps, optimizer_impl, warmup_steps, schedule, "
        "max_grad_norm, nonfinite, nonfinite_skips, loss_aggregation, loss_norm_length, head, teacher_head_block, student_head_block, val_every, gap_buckets, task_schedule, log_rollouts"
    )


def test_unknown_plugin_key():
    assert err("sampler.top=0.5").startswith(
        "command line: sampler.top: unknown key for sampler 'top_p' (did you mean 'top_p'?); valid keys: "
        "temperature, top_p, max_new_tokens, n"
    )


def test_wrong_types():
    assert err("support.k=abc") == "command line: support.k: expected integer, got 'abc' (str)"
    assert err("stages.opd.steps=1.5") == "command line: stages.opd.steps: expected integer, got 1.5 (float)"
    assert err("run.checkpoints=3") == "command line: run.checkpoints: expected boolean, got 3 (int)"
    assert err("maskers.0.tokens=5") == "command line: maskers.0.tokens: expected list of string, got 5 (int)"


def test_int_is_accepted_for_float():
    cfg = demo_cfg("stages.opd.lr=1")
    assert cfg["stages"]["opd"]["lr"] == 1


def test_yaml_error_names_file_and_line(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text(textwrap.dedent("""\
        run:
          name: x
        loss:
          name: lsm
          temprature: 2
    """))
    assert err(confs=[str(f)]) == f"{f}:5: loss.temprature: unknown key for loss 'lsm'; valid keys: (none)"
    g = tmp_path / "y.yaml"
    g.write_text("stages:\n  opd:\n    stepz: 1\n")
    assert err(confs=[str(g)]).startswith(f"{g}:3: stages.opd.stepz: unknown key (did you mean 'steps'?)")


def test_missing_conf_file_and_bad_yaml(tmp_path):
    assert err(confs=[str(tmp_path / "nope.yaml")]) == f"conf={tmp_path / 'nope.yaml'}: no such config file"
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    assert err(confs=[str(bad)]).startswith(f"{bad}: not valid YAML")


def test_override_without_equals():
    assert err("loss") == "command line: 'loss': expected key=value (or conf=FILE)"


def test_changing_name_replaces_the_node():
    # base: support {name: teacher_topk, k: 32}; the new plugin must not inherit k
    cfg = demo_cfg("support.name=sampled_token", "loss.name=sampled_token")
    assert cfg["support"] == {"name": "sampled_token"}
    assert cfg["loss"] == {"name": "sampled_token", "clip_eps": 0.2, "dual_clip": 3.0}


def test_layer_changing_name_replaces_the_node(tmp_path):
    f = tmp_path / "l.yaml"
    f.write_text("support:\n  name: sampled_token\nloss:\n  name: sampled_token\n  clip_eps: 0.1\n")
    cfg = compose([str(ROOT / "conf/demo.yaml"), str(f)], [])
    assert cfg["support"] == {"name": "sampled_token"}
    assert cfg["loss"]["clip_eps"] == 0.1


def test_same_name_merges_options():
    cfg = demo_cfg("support.k=4")
    assert cfg["support"] == {"name": "topk", "k": 4, "side": "teacher", "plus_sampled": False}  # (teacher_topk)


def test_resolved_config_has_plugin_defaults():
    cfg = demo_cfg()
    assert cfg["sampler"] == {"name": "top_p", "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 64, "n": 4}


def test_list_override_and_index():
    cfg = demo_cfg("maskers.0.tokens=[<think>]")
    assert cfg["maskers"][0]["tokens"] == ["<think>"]
    assert err("maskers.5.name=chunks").startswith("command line: maskers.5.name: index 5 is out of range")


def test_later_layers_win(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("run:\n  seed: 1\n")
    b.write_text("run:\n  seed: 2\n")
    assert compose([str(a), str(b)], [])["run"]["seed"] == 2
    assert compose([str(a), str(b)], ["run.seed=3"])["run"]["seed"] == 3


def test_renaming_a_list_slot_item_replaces_it():
    cfg = demo_cfg("maskers.0.name=chunks")
    assert [m["name"] for m in cfg["maskers"]] == ["chunks"] and "tokens" not in cfg["maskers"][0]


def test_new_parent_key_on_the_command_line_is_blamed_on_it():
    assert err("trainerr.devices=2").startswith("command line: trainerr: unknown key (did you mean 'trainer'?)")
    assert err("stages.opdd.lr=1").startswith("command line: stages.opdd: unknown key (did you mean 'opd'?)")


def test_overlays_compose_onto_their_base(tmp_path):
    from opdlm.config import compose
    cfg = compose([str(ROOT / "conf/ablations/k/4.yaml")], [])
    demo = compose([str(ROOT / "conf/demo.yaml")], [])
    assert cfg["support"]["k"] == 4 and cfg["run"]["name"] == "demo"
    assert cfg["stages"]["opd"] == demo["stages"]["opd"] and cfg["student"] == demo["student"]
    # the sweep's pattern (demo first, then the overlay) gives the same config: the base applies once
    assert compose([str(ROOT / "conf/demo.yaml"), str(ROOT / "conf/ablations/k/4.yaml")], []) == cfg
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("# b\nbase: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml:2: base: circular \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        compose([str(tmp_path / "a.yaml")], [])
    (tmp_path / "c.yaml").write_text("base: [nope.yaml]\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1: base: no such config file '.*nope.yaml'"):
        compose([str(tmp_path / "c.yaml")], [])


def test_keys_with_a_null_default_are_typed():
    from conftest import demo_cfg as cfg
    with pytest.raises(ConfigError, match=r"command line: run.stage_cache: expected a string \(a folder\) or null, got 5 \(int\)"):
        cfg("run.stage_cache=5")
    with pytest.raises(ConfigError, match=r"teacher.path: expected a string \(a folder\) or null, got \[1, 2\]"):
        cfg("teacher.path=[1,2]")
    assert cfg("run.stage_cache=null")["run"]["stage_cache"] is None


def test_every_null_default_has_a_declared_type():
    from opdlm.config import BASE_FILE, NULLABLE, load_yaml

    def nulls(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from nulls(v, f"{prefix}{k}.")
            elif v is None:
                yield f"{prefix}{k}"
    assert sorted(nulls(load_yaml(BASE_FILE))) == sorted(NULLABLE)


def test_config_errors_carry_their_key_and_origin(tmp_path):
    from opdlm.builder import build_run
    from opdlm.config import Where
    where = Where()
    with pytest.raises(ConfigError) as e:
        build_run(compose([str(ROOT / "conf/demo.yaml")], ["support.k=1"], where))
    err = where.locate(e.value)
    assert (err.origin, err.key) == ("command line", "support.k")
    assert err.detail.startswith("loss 'lsm' needs a support of at least 2 tokens")
    assert str(err) == f"command line: support.k: {err.detail}"
    layer = tmp_path / "x.yaml"
    layer.write_text("loss:\n  name: lsm\n  temprature: 1\n")
    with pytest.raises(ConfigError) as e:
        compose([str(layer)], [])
    assert (e.value.origin, e.value.key) == (f"{layer}:3", "loss.temprature")


@pytest.mark.parametrize("override, said", [
    ("trainer.log_every_n_steps=[5]",
     "command line: trainer.log_every_n_steps: lightning.Trainer takes an integer or null here, got [5] (list)"),
    ("trainer.accelerator=3", "command line: trainer.accelerator: lightning.Trainer takes a string here, got 3 (int)"),
    ("trainer.precision=bf17",
     "command line: trainer.precision: lightning.Trainer takes one of 64, 32, 16, 'transformer-engine', "
     "'transformer-engine-float16', '16-true', '16-mixed', 'bf16-true', 'bf16-mixed', '32-true', '64-true', '64', "
     "'32', '16', 'bf16' or null here, got 'bf17' (str)"),
    ("plugin_paths=[5]", "command line: plugin_paths: item 0: expected a folder path, got 5 (int)"),
    ("plugin_paths=here", "command line: plugin_paths: expected a list, got 'here' (str)"),
    ("stages.opd.betas=[0.9,", "command line: 'stages.opd.betas=[0.9,': stages.opd.betas: the value is not valid "
                               "YAML (while parsing a flow node did not find expected node content)"),
    ("stages.opd.lr=${stages.nope.lr}",
     "command line: stages.opd.lr: interpolation failed: ${stages.nope.lr} names no key of the config"),
    ("stages.opd.lr=${stages.opd.lr}", "command line: stages.opd.lr: interpolation failed: Recursive interpolation detected"),
    ("stages.opd.lr=${run.name}", "command line: stages.opd.lr: expected number, got 'demo' (str)"),
])
def test_bad_values_are_one_line_naming_the_key(override, said):
    with pytest.raises(ConfigError) as e:
        demo_cfg(override)
    assert str(e.value) == said


def test_a_weighted_sum_whose_weights_are_all_zero_is_refused(capsys):
    from opdlm.cli import main
    assert main(["--check", "loss={name: weighted_sum, terms: [{name: lsm, weight: 0}, {name: sampled_token, "
                 "weight: 0.0}]}"]) == 2
    assert capsys.readouterr().err.strip() == (
        "opdlm: config error: command line: loss.terms: every weight is 0, so the loss is 0 and OPD would train "
        "nothing; give at least one term a weight > 0 (terms.0.weight, terms.1.weight)")


def test_trainer_values_lightning_takes_pass():
    for override in ("trainer.devices=auto", "trainer.devices=1", "trainer.precision=bf16-mixed", "trainer.precision=32",
                     "trainer.deterministic=warn", "trainer.deterministic=true", "trainer.num_nodes=1"):
        demo_cfg(override)


def test_interpolations_are_resolved_before_the_type_checks():
    """A typed key may take another key's value: the check sees the value, not the ${...} text."""
    cfg = demo_cfg("stages.opd.lr=${stages.student_sft.lr}", "stages.student_sft.lr=0.0123",
                   "support.k=${sampler.n}", "sampler.n=3")
    assert cfg["stages"]["opd"]["lr"] == 0.0123 and cfg["support"]["k"] == 3


def test_a_masker_string_written_as_a_control_token_but_not_one_warns_naming_its_pieces():
    """A typo of <|im_end|> on the real Qwen tokenizer: its pieces would be masked; the warning names them."""
    from conftest import TINY, qwen_tokenizer_dir
    from transformers import AutoTokenizer

    from opdlm.builder import build_run
    from opdlm.cli import main
    from opdlm.errors import ConfigWarning
    qwen = qwen_tokenizer_dir()
    words = [*TINY, f"student.tokenizer_path={qwen}", f"teacher.tokenizer_path={qwen}",
             "maskers.0.tokens=[<think>, <|im_ennd|>]"]
    with pytest.warns(ConfigWarning) as got:
        build_run(demo_cfg(*words))
    (w,) = [str(x.message) for x in got]
    pieces = AutoTokenizer.from_pretrained(qwen).tokenize("<|im_ennd|>")
    assert len(pieces) > 1
    assert w == (f"masker special_tokens: tokens: '<|im_ennd|>' is not one token of the student tokenizer, so its "
                 f"{len(pieces)} pieces {', '.join(repr(p) for p in pieces)} are masked instead (did you mean "
                 f"'<|im_end|>'?) (strict: true makes this an error)")
    with pytest.warns(ConfigWarning):  # the command line shows it as one line (opdlm.cli._warning_line)
        assert main(["--check", *words]) == 0
