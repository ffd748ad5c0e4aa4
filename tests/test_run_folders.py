"""Run folders and the stage cache can be trusted: a run owns its folder, another config's finished
result is never silently replaced, damaged cache entries are found and recomputed, evaluation
settings never retrain, and a cached re-run keeps the stages' own timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY, demo_cfg

from opdlm.pipeline import FolderBusy, Runner

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path: Path, *extra: str) -> dict:
    return Runner(demo_cfg(*TINY, f"run.out_dir={tmp_path}", *extra)).run()


def test_cached_rerun_keeps_the_stages_own_seconds(tmp_path, capsys):
    first = run(tmp_path)
    capsys.readouterr()
    again = run(tmp_path)
    out = capsys.readouterr().out
    assert out.count("(same config and code), skipping") == 3
    for key in ("teacher", "student_before", "student_after"):
        assert again[key]["seconds"] == first[key]["seconds"] > 0
    assert again["seconds"] == first["seconds"]
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["seconds"] == first["seconds"] and f"{first['seconds']:.1f} s of compute" in out


def test_damaged_cache_entries_are_recomputed(tmp_path, capsys):
    run(tmp_path)
    demo = tmp_path / "demo"
    (demo / "teacher" / "stage.json").write_text('{"stage": "teacher_sft", "fingerp')  # truncated
    weights = demo / "student_sft" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte changed, same size
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    run(tmp_path)
    out = capsys.readouterr().out
    assert f"stage teacher_sft: {demo / 'teacher' / 'stage.json'} is unreadable (JSONDecodeError); running the stage again" in out
    assert f"stage student_sft: {demo / 'student_sft'} is damaged (model.safetensors: checksum differs); running the stage again" in out
    assert "[opdlm] stage teacher_sft: " in out and json.loads((demo / "teacher" / "stage.json").read_text())["files"]


def test_changing_only_evaluation_settings_does_not_retrain(tmp_path, capsys):
    run(tmp_path)
    capsys.readouterr()
    res = run(tmp_path, "eval.test_prompts=3", "run.overwrite=true")
    out = capsys.readouterr().out
    assert out.count("weights cached in") == 3 and "parameters," not in out and "rollouts" not in out
    info = json.loads((tmp_path / "demo" / "student" / "stage.json").read_text())
    assert len(info["evaluations"]) == 2  # both settings' metrics are kept
    assert res["student_after"]["test"] in [e["test"] for e in info["evaluations"].values()]
    capsys.readouterr()
    run(tmp_path, "run.overwrite=true")  # back to the first setting: all cached
    assert capsys.readouterr().out.count("(same config and code), skipping") == 3


def test_another_configs_result_is_not_replaced_without_the_flag(tmp_path, capsys):
    run(tmp_path)
    demo = tmp_path / "demo"
    before = (demo / "results.md").read_text()
    with pytest.raises(FolderBusy) as e:
        run(tmp_path, "stages.opd.lr=1.0e-4")
    msg = str(e.value)
    assert msg == (f"{demo} holds the finished result of another config (differs in stages.opd.lr: 0.0006 -> 0.0001); "
                   f"choose another run.name, or set run.overwrite=true to replace it")
    assert (demo / "results.md").read_text() == before  # nothing touched
    assert yaml.safe_load((demo / "config.yaml").read_text())["stages"]["opd"]["lr"] == 0.0006
    run(tmp_path, "stages.opd.lr=1.0e-4", "run.overwrite=true")
    assert yaml.safe_load((demo / "config.yaml").read_text())["stages"]["opd"]["lr"] == 0.0001
    saved = json.loads((demo / "results.json").read_text())
    info = json.loads((demo / "student" / "stage.json").read_text())
    (test,) = [e["test"] for e in info["evaluations"].values()]
    assert saved["student_after"]["test"] == test  # config, results and the student agree


@pytest.mark.slow
def test_a_second_live_run_on_the_same_folder_is_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    first = subprocess.Popen([sys.executable, "-u", str(ROOT / "run.py"), *TINY, f"run.out_dir={tmp_path}",
                              "stages.opd.steps=200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=ROOT)
    deadline = time.time() + 60
    while not (tmp_path / "demo" / ".lock").is_file() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, f"run.out_dir={tmp_path}",
                             "loss.name=sampled_token", "support.name=sampled_token"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2
    assert second.stderr.strip().startswith(f"opdlm: error: run folder {tmp_path / 'demo'} is in use by process {first.pid}")
    assert len(second.stderr.strip().splitlines()) == 1
    demo = tmp_path / "demo"
    assert yaml.safe_load((demo / "config.yaml").read_text())["loss"]["name"] == "lsm"  # the first run's files only
    assert json.loads((demo / "results.json").read_text())["student_after"]["test"]


def test_overwriting_leaves_nothing_of_the_other_config(tmp_path, capsys):
    """With run.overwrite the old results and the stage folders of the other config go first: a run
    that then fails leaves config.yaml with only the stages that belong to it."""
    from opdlm.errors import PluginError
    run(tmp_path)
    demo = tmp_path / "demo"
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken.py").write_text(
        "from opdlm.plugin_api import Loss\nfrom opdlm.registry import LOSSES\nfrom opdlm.types import LossOutput\n\n\n"
        "@LOSSES.register('broken')\nclass Broken(Loss):\n    def compute(self, inputs):\n"
        "        if not inputs.rollout.examples:  # the config check's probe batch: pass it\n"
        "            return LossOutput(token_loss=inputs.student.token_logprob * 0)\n"
        "        return None  # real rollouts: break the contract\n")
    with pytest.raises(PluginError):
        run(tmp_path, f"plugin_paths=[{plugins}]", "loss.name=broken", "run.overwrite=true")
    assert yaml.safe_load((demo / "config.yaml").read_text())["loss"]["name"] == "broken"
    assert not (demo / "results.json").exists() and not (demo / "results.md").exists()
    assert not (demo / "student").exists()  # the other config's student is gone
    assert (demo / "teacher" / "stage.json").is_file()  # the SFT stages belong to this config too
