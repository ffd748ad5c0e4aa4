"""Faults after --check passes, and inputs that used to end in tracebacks: each is one line that
names the key, file or plugin, with a meaningful exit code, and leaves the run folder consistent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, demo_cfg, start_until_opd_checkpoint
from test_bad_input import plan_err

from opdlm.builder import build_run
from opdlm.cli import main
from opdlm.models import save_hf

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def stop_in_opd(tmp_path: Path, sig: signal.Signals) -> tuple[int, str]:
    """A run stopped with ``sig`` once its OPD stage has written a checkpoint: (exit code, stderr)."""
    over = [o for o in TINY if not o.startswith("run.checkpoints")]
    cmd = [sys.executable, "-u", str(ROOT / "run.py"), *over, f"run.out_dir={tmp_path}", "stages.opd.steps=400",
           "run.checkpoint_every=5"]
    proc = start_until_opd_checkpoint(cmd, tmp_path / "demo", stderr=subprocess.PIPE)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_ctrl_c_says_where_the_run_stopped_and_how_to_continue(tmp_path):
    code, err = stop_in_opd(tmp_path, signal.SIGINT)
    assert code == 130, err[-2000:]
    msg = last_line(err)
    assert msg.startswith("opdlm: interrupted (Ctrl-C) in stage opd at optimizer step "), msg
    assert "the same command continues it from" in msg and "last.ckpt" in msg
    assert "Traceback" not in err
    run = tmp_path / "demo"
    assert (run / "teacher" / "stage.json").is_file() and not (run / "student").exists()
    assert not (run / "results.json").exists()


@pytest.mark.slow
def test_sigterm_is_reported_as_terminated_with_143_and_the_run_continues(tmp_path):
    """SIGTERM stops the stage as Ctrl-C does (the checkpoint is kept) but says so, with 128 + 15."""
    code, err = stop_in_opd(tmp_path, signal.SIGTERM)
    assert code == 143, err[-2000:]
    msg = last_line(err)
    assert msg.startswith("opdlm: terminated (SIGTERM) in stage opd at optimizer step "), msg
    assert "the same command continues it from" in msg and "last.ckpt" in msg
    assert "Traceback" not in err and "Ctrl-C" not in err
    assert (tmp_path / "demo" / "checkpoints" / "opd" / "last.ckpt").is_file()
    assert not (tmp_path / "demo" / "results.json").exists()


@pytest.mark.slow
def test_a_loss_that_returns_nothing_is_named(tmp_path):
    """Found by the config check's probe, before any stage runs."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "lazy.py").write_text(
        "from opdlm.plugin_api import Loss\nfrom opdlm.registry import LOSSES\n\n\n"
        "@LOSSES.register('lazy')\nclass Lazy(Loss):\n    def compute(self, inputs):\n        return None\n")
    res = cli(*TINY, f"run.out_dir={tmp_path / 'runs'}", f"plugin_paths=[{plugins}]", "loss.name=lazy")
    assert res.returncode == 1, res.stderr[-2000:]
    msg = last_line(res.stderr)
    assert msg.startswith("opdlm: plugin error: loss 'lazy' (") and str(plugins / "lazy.py") in msg
    assert "compute() returned NoneType; it must return LossOutput(token_loss=<tensor of shape" in msg
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("stage.json"))


def test_damaged_or_missing_weights_are_found_at_check(tmp_path, capsys):
    cfg = demo_cfg(*TINY)
    built = build_run(cfg)
    folder = tmp_path / "t"
    save_hf(built.teacher.build(0), built.teacher.tokenizer, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(["--check", f"teacher.path={folder}"]) == 2
    err = last_line(capsys.readouterr().err)
    assert err.startswith(f"opdlm: config error: command line: teacher.path: '{weights}' is damaged or truncated")
    weights.unlink()
    assert main(["--check", f"teacher.path={folder}"]) == 2
    assert f"teacher.path: '{folder}' has no weights" in capsys.readouterr().err


def test_values_that_used_to_be_tracebacks(tmp_path):
    assert plan_err("teacher.dtype=float17") == (
        "teacher.dtype: must be a torch floating dtype (float32, bfloat16, float16, float64), got 'float17'")
    assert plan_err("run.name=").startswith("run.name: must be a folder name")
    assert plan_err("run.name=a/b").startswith("run.name: must be a folder name")
    afile = tmp_path / "f"
    afile.write_text("x")
    assert plan_err(f"run.out_dir={afile}") == f"run.out_dir: '{afile}' is a file, not a folder"
    assert plan_err(f"run.stage_cache={afile}/c") == (
        f"run.stage_cache: '{afile}' (on the way to '{afile}/c') is a file, not a folder")
    assert plan_err("run.out_dir=/sys/opdlm/x").startswith("run.out_dir: cannot write in '/sys'")
    assert plan_err("trainer.devices=0").startswith("trainer.devices: ")
    assert plan_err("trainer.precision=fp8").startswith("command line: trainer.precision: lightning.Trainer takes one of 64, ")  # noqa: E501


def test_jsonl_faults_name_the_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    lines = [json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(30)]
    data.write_bytes(("\n".join(lines[:3]) + "\n").encode() + b'{"prompt": "\xff", "answer": "1"}\n')
    msg = plan_err("task.name=jsonl", f"task.path={data}")
    assert msg == f"task.path: {data}:4: not UTF-8 (byte 0xff at column 13)"
    data.write_text("\n".join(lines) + "\n")
    assert plan_err("task.name=jsonl", f"task.path={data}").startswith(
        "task: stages.teacher_sft trains on reference solutions, but the train split has examples without one")
    build_run(demo_cfg("task.name=jsonl", f"task.path={data}", "stages.teacher_sft.steps=0",
                        "stages.student_sft.steps=0"))


def test_plugin_path_variable_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPDLM_PLUGIN_PATH", str(tmp_path / "nowhere"))
    assert main(["--check"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"opdlm: config error: OPDLM_PLUGIN_PATH (environment variable): '{tmp_path / 'nowhere'}' is not a folder")


def test_check_shows_nested_plugin_nodes_with_their_defaults(capsys):
    assert main(["--check", "loss={name: weighted_sum, terms: [{name: sampled_token}, {name: lsm, weight: 0.5}]}",
                 "support={name: union, first: {name: teacher_topk, k: 3}, second: {name: student_topk, k: 3}}"]) == 0
    out = capsys.readouterr().out
    assert "- name: sampled_token\n    clip_eps: 0.2\n    dual_clip: 3.0\n    weight: 1.0" in out
    assert "first:\n    name: topk\n    k: 3\n    side: teacher" in out


@pytest.mark.slow
def test_progress_goes_to_stderr_and_stdout_keeps_the_table(tmp_path):
    over = [o for o in TINY if not o.startswith("trainer.progress_bar")]
    res = cli(*over, f"run.out_dir={tmp_path}", "trainer.progress_bar=true")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| student after OPD |" in res.stdout and "it/s" not in res.stdout
    assert "it/s" in res.stderr


@pytest.mark.parametrize("bad", ["trainer.devices=0", "teacher.dtype=float17"])
def test_check_errors_are_one_line_on_the_command_line(bad, capsys):
    assert main(["--check", bad]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.slow
def test_examples_longer_than_the_models_positions_are_an_error_or_counted(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "solution": f"\\boxed{{{i + 1}}}"} for i in range(40)]
    rows[7]["prompt"] = "1+" * 1000 + "1="  # 2,002 characters: one token each for the character tokenizer
    rows[9]["solution"] = "9" * 300
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = ["task.name=jsonl", f"task.path={data}", "task.solution_field=solution", "task.split_field=null",
            "task.val_fraction=0.0", "task.test_fraction=0.25", "stages.teacher_sft.val_every=0", "stages.opd.val_every=0"]
    msg = plan_err(*base)
    assert msg.startswith("task: ") and "(line " in msg and "of the task's file) needs" in msg
    assert "for the teacher, more than its 256 (teacher.max_positions); set data.too_long=skip" in msg
    small = ["stages.teacher_sft.batch_size=8", "stages.student_sft.batch_size=8", "stages.opd.prompts_per_step=8"]
    built = build_run(demo_cfg(*base, *small, "data.too_long=skip"))
    assert sum(built.dropped.values()) == 2
    kept = [e.prompt for s in ("train", "val", "test") for e in built.task.examples(s)]
    assert len(kept) == 38 and rows[7]["prompt"] not in kept
    from opdlm.evaluation import task_extracts
    assert task_extracts(built.task) and built.task.extract("\\boxed{12}") == "12"  # maj@k, unparsed still reported
    # the run says what it left out
    res = cli(*TINY, *base, "data.too_long=skip", f"run.out_dir={tmp_path / 'runs'}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[opdlm] data.too_long=skip: left out " in res.stdout and "examples longer than the models' positions" in res.stdout
    assert "[opdlm] task jsonl: 40 lines, 40 distinct prompts: 30 train / 0 val / 10 test prompts\n" in res.stdout


@pytest.mark.slow
def test_a_file_where_the_run_folder_should_be_is_one_line(tmp_path):
    (tmp_path / "demo").write_text("not a folder")
    res = cli(*TINY, f"run.out_dir={tmp_path}")
    assert res.returncode == 1
    assert res.stderr.strip() == f"opdlm: error: cannot write or read '{tmp_path / 'demo'}': File exists"


def _full_disk_save(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
    """What the safetensors writer raises when the disk is full (its words, measured on a full tmpfs)."""
    from safetensors import SafetensorError
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_at_a_stage_save_is_one_line_and_keeps_nothing_half_written(tmp_path, capsys, monkeypatch):
    import transformers
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", _full_disk_save)
    assert main([*TINY, f"run.out_dir={tmp_path}"]) == 1
    err = last_line(capsys.readouterr().err)
    assert err.startswith("opdlm: error: cannot write or read '") and "No space left on device: the model needs about " in err
    assert "MB are free; make room (or set run.out_dir elsewhere) and run the same command again" in err
    assert not list(tmp_path.rglob("stage.json"))  # no stage folder to trust


def test_save_on_a_really_full_disk_names_the_folder_and_the_space(tmp_path):
    """On a 64 KB tmpfs (where this machine lets a test mount one), the real writer's failure."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        cfg = demo_cfg(*TINY, "teacher.hidden_size=64", "teacher.intermediate_size=256")
        built = build_run(cfg)
        model = built.teacher.build(0)
        with pytest.raises(OSError) as e:
            save_hf(model, built.teacher.tokenizer, mnt / "teacher")
        assert e.value.errno == 28 and e.value.filename == str(mnt / "teacher")
        need = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
        assert e.value.strerror.startswith(f"No space left on device: the model needs about {need:,.1f} MB and ")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
