"""Nothing is lost to a kill: a real run killed (SIGKILL) in the middle of the OPD stage and run
again with the same command continues from its last checkpoint (same optimizer step, data order and
random streams) and ends with the student of an uninterrupted run of the same seed, bit for bit on
this CPU (one thread; the path is deterministic there). Also: a checkpoint of another config is
set aside with the reason, and half-written stage folders are never trusted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, start_until_opd_checkpoint

from opdlm.cache import remove_stale as _remove_stale
from opdlm.cache import replace_folder as _replace_folder

ROOT = Path(__file__).resolve().parent.parent
STEPS = 400


def command(out: Path, *extra: str) -> list[str]:
    over = [o for o in TINY if not o.startswith("run.checkpoints")]
    return [sys.executable, "-u", str(ROOT / "run.py"), *over, f"run.out_dir={out}", f"stages.opd.steps={STEPS}",
            "run.checkpoint_every=5", "trainer.threads=1", *extra]


def env() -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    e.pop("LOCAL_RANK", None)
    return e


def student(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(folder / "demo" / "student" / "model.safetensors"))


@pytest.mark.slow
def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    killed = tmp_path / "killed"
    proc = start_until_opd_checkpoint(command(killed), killed / "demo", stderr=subprocess.STDOUT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "demo" / "student").exists()  # the interrupted stage left no folder to trust
    again = subprocess.run(command(killed), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout
    assert out.count("(same config and code), skipping") == 2  # the two SFT stages
    line = next(x for x in out.splitlines() if "stage opd: resuming from" in x)
    step = int(line.rsplit("optimizer step ", 1)[1].rstrip(")"))
    assert 0 < step < STEPS, line
    assert sorted(p.name for p in (killed / "demo" / "checkpoints" / "opd").iterdir()) == ["last.ckpt"]  # no last-v1
    # the resume is exact (below), so Lightning's mid-epoch resume warning is not shown
    assert "unreliable results" not in again.stdout + again.stderr
    whole = tmp_path / "whole"
    ref = subprocess.run(command(whole), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = student(killed), student(whole)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_checkpoint_of_another_config_is_set_aside(tmp_path):
    run = subprocess.run(command(tmp_path, "stages.opd.steps=10"), capture_output=True, text=True, env=env(),
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt_dir = tmp_path / "demo" / "checkpoints" / "opd"
    assert (ckpt_dir / "last.ckpt").is_file()
    import shutil
    shutil.rmtree(tmp_path / "demo" / "student")  # as if killed after the last checkpoint
    other = subprocess.run(command(tmp_path, "stages.opd.steps=10", "stages.opd.lr=1.0e-4", "run.overwrite=true"),
                           capture_output=True,
                           text=True, env=env(), cwd=ROOT, timeout=600)
    assert other.returncode == 0, other.stderr[-3000:]
    line = next(x for x in other.stdout.splitlines() if "stage opd: not resuming from" in x)
    assert "written for another config or code" in line and "the stage starts from step 0" in line
    assert list(ckpt_dir.glob("last.ckpt.*.set-aside"))


def test_half_written_folders_are_not_trusted(tmp_path):
    folder, tmp = tmp_path / "student", tmp_path / ".student.tmp-1"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "stage.json").write_text("{}")
    _replace_folder(tmp, folder)
    assert (folder / "stage.json").is_file() and not (folder / "old.txt").exists() and not tmp.exists()
    assert not list(tmp_path.glob(".student.old"))
    # temporary folders of writers that were killed are removed; a live writer's stays
    dead, live = tmp_path / ".student.tmp-999999999", tmp_path / f".student.tmp-{os.getpid()}"
    dead.mkdir()
    live.mkdir()
    _remove_stale(folder)
    assert not dead.exists() and live.exists()
