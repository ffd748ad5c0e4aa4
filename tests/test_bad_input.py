"""Bad input is a one-line ConfigError before any weights load (build_run loads none)."""

from __future__ import annotations

import pytest
from conftest import demo_cfg

from opdlm.builder import build_run
from opdlm.errors import ConfigError
from opdlm.models import char_tokenizer


def plan_err(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        build_run(demo_cfg(*overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_k_below_two_with_lsm():
    assert plan_err("support.k=1").startswith("support.k: loss 'lsm' needs a support of at least 2 tokens")
    assert plan_err("support.name=sampled_token").startswith("support.name: loss 'lsm' needs a support of at least 2")


def test_k_larger_than_vocabulary():
    assert plan_err("support.k=100000").startswith("support.k: 100000 is larger than the teacher's vocabulary")


def test_sampler_ranges():  # declared in the options' annotations (Range): refused where they were set
    assert plan_err("sampler.top_p=0") == "command line: sampler.top_p: must be in (0, 1], got 0"
    assert plan_err("sampler.top_p=1.5") == "command line: sampler.top_p: must be in (0, 1], got 1.5"
    assert plan_err("sampler.temperature=0") == "command line: sampler.temperature: must be > 0, got 0"
    assert plan_err("sampler.temperature=-1.0") == "command line: sampler.temperature: must be > 0, got -1.0"


def test_special_token_that_is_not_one_token():
    msg = plan_err("maskers.0.tokens=[<think>,zz]")
    assert msg.startswith("maskers.0.tokens: 'zz' contains characters the student tokenizer does not know")


def test_missing_model_folder(tmp_path):
    missing = tmp_path / "nope"
    assert plan_err(f"teacher.path={missing}") == (
        f"teacher.path: model folder '{missing}' does not exist (give a local Hugging Face folder)"
    )
    (tmp_path / "empty").mkdir()
    assert plan_err(f"student.path={tmp_path / 'empty'}").startswith("student.path: ")


def test_different_vocabularies_under_identity(tmp_path):
    tok = char_tokenizer(["abc 0123456789+-=;{}\\boxed"])
    tok.save_pretrained(tmp_path / "tok")
    msg = plan_err(f"student.tokenizer_path={tmp_path / 'tok'}")
    assert msg.startswith("aligner: 'identity' needs one vocabulary")
    assert msg.endswith("choose a cross-tokenizer aligner")


def test_framework_value_ranges():
    assert plan_err("stages.opd.schedule=cos") == "command line: stages.opd.schedule: must be constant or cosine, got 'cos'"
    assert plan_err("stages.opd.num_micro_batches=0") == "command line: stages.opd.num_micro_batches: must be >= 1, got 0"
    assert plan_err("stages.opd.lr=0") == "command line: stages.opd.lr: must be > 0, got 0"
    assert plan_err("eval.greedy=false", "eval.sampled=false").startswith("eval.greedy: must be true")


def test_task_ranges():
    assert plan_err("task.min_terms=1") == "task.min_terms: must be >= 2, got 1"
    assert plan_err("task.ops=/").startswith("task.ops: must be a non-empty subset")


def test_chat_template_must_match_under_identity():
    assert plan_err("teacher.chat_template=true").startswith(
        "teacher.chat_template: aligner 'identity' shows the teacher the student's prompt tokens")


def test_fp16_loss_scaling_is_rejected():
    assert plan_err("trainer.precision=16-mixed").startswith("trainer.precision: must be 32-true, bf16-mixed")


def test_jsonl_with_an_empty_train_split(tmp_path):
    import json
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"q": f"{i}?", "a": str(i), "s": "test"}) for i in range(3)))
    msg = plan_err("task.name=jsonl", f"task.path={f}", "task.prompt_field=q", "task.answer_field=a",
                   "task.split_field=s")
    assert msg == f"task.path: '{f}' leaves the train split empty (no line has s: train)"


def test_jsonl_field_of_the_wrong_type_stops_the_run_with_one_line(tmp_path, capsys):
    import json

    from opdlm.cli import main
    f = tmp_path / "d.jsonl"
    rows = [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1), "solution": f"\\boxed{{{i + 1}}}"}) for i in range(60)]
    rows[11] = '{"prompt": "11+1=", "answer": NaN, "solution": "\\\\boxed{12}"}'
    f.write_text("\n".join(rows) + "\n")
    out = tmp_path / "runs"
    assert main(["task.name=jsonl", f"task.path={f}", "task.solution_field=solution", f"run.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err == f'opdlm: config error: command line: task.path: {f}:12: "answer" must be a string or an integer, got NaN\n'
    assert not out.exists()  # nothing trained, nothing written


def test_check_names_the_jsonl_splits(tmp_path, capsys):
    import json

    from opdlm.cli import main
    f = tmp_path / "d.jsonl"  # 100 distinct prompts on 300 lines
    f.write_text("".join(json.dumps({"prompt": f"{i % 100}+1=", "answer": str(i % 100 + 1)}) + "\n" for i in range(300)))
    assert main(["--check", "task.name=jsonl", f"task.path={f}", "stages.teacher_sft.steps=0", "stages.student_sft.steps=0"]) == 0
    err = capsys.readouterr().err
    assert "# task jsonl: 300 lines, 100 distinct prompts: 80 train / 10 val / 10 test prompts\n" in err


def test_a_batch_larger_than_the_train_split_fails_before_training():
    assert plan_err("task.n_train=40", "stages.opd.prompts_per_step=48") == (
        "stages.teacher_sft.batch_size: a batch of 64 is larger than the task's 40 training examples")
    assert plan_err("task.n_train=64", "stages.opd.prompts_per_step=80") == (
        "stages.opd.prompts_per_step: a batch of 80 is larger than the task's 64 training examples")
    build_run(demo_cfg("task.n_train=64", "stages.opd.prompts_per_step=80", "stages.opd.steps=0"))  # a stage that does not train
