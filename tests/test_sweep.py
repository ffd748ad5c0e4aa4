"""The sweep runner: overlays x seeds through run.py, shared SFT stages, the comparison table."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY

from opdlm.sweep import main

pytestmark = pytest.mark.slow  # subprocess runs: deselected by -m "not slow"


def test_sweep_runs_overlays_over_seeds_and_writes_tables(tmp_path, capsys):
    """Two overlays, each on its own base config with a run name and a student SFT of its own (not the
    demo's): the SFT stages are computed once per seed from that base, and the table finds the runs."""
    overlays = []
    for name in ("sampled_token", "lsm_mask"):
        ov = tmp_path / f"{name}.yaml"
        ov.write_text(f"base: {ROOT / 'conf/ablations/method' / (name + '.yaml')}\nrun:\n  name: mine\n"
                      "stages:\n  student_sft:\n    lr: 2.0e-3\n")
        overlays.append(str(ov))
    tiny = [o for o in TINY if not o.startswith(("trainer.progress_bar", "run."))]
    rc = main(["--name", "t", "--seeds", "0,1", "--jobs", "2", "--out-dir", str(tmp_path), *overlays, *tiny])
    assert rc == 0
    out = tmp_path / "t"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["overlay"] for r in rows] == ["sampled_token", "lsm_mask"]
    for r in rows:
        assert r["seeds"] == "2"
        assert 0.0 <= float(r["acc_greedy_mean"]) <= 100.0
        assert 0.0 <= float(r["teacher_acc_greedy"]) <= 100.0
        assert float(r["grad_norm_mean"]) > 0
    res = [json.loads((out / f"lsm_mask_s{s}" / "mine" / "results.json").read_text()) for s in (0, 1)]
    teacher = [100 * r["teacher"]["test"]["test/acc_greedy"] for r in res]  # the table's numbers are the runs' own
    assert float(rows[1]["teacher_acc_greedy"]) == pytest.approx(sum(teacher) / 2)
    after = [100 * r["student_after"]["test"]["test/acc_greedy"] for r in res]
    assert float(rows[1]["acc_greedy_mean"]) == pytest.approx(sum(after) / 2)
    table = (out / "results.md").read_text()
    assert "| sampled_token | 2 |" in table and "| lsm_mask | 2 |" in table
    # one teacher and one student SFT per seed, from the overlays' base (the demo's lr would add two more)
    entries = [p for p in (out / "cache").iterdir() if not p.name.startswith(".")]  # .<entry>.lock: the locks
    assert sorted(p.name.split("-")[0] for p in entries) == ["student_sft"] * 2 + ["teacher_sft"] * 2
    logs = (out / "logs" / "lsm_mask_s1.log").read_text()
    for stage in ("teacher_sft", "student_sft"):  # cached weights (evaluated again: this overlay's sampler differs)
        assert f"stage {stage}: weights cached" in logs or f"stage {stage}: cached" in logs


def test_sweep_rejects_a_missing_overlay(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out-dir", str(tmp_path), str(tmp_path / "nope.yaml")])
    assert "no such overlay file" in capsys.readouterr().err


@pytest.mark.parametrize("args, said", [
    (["--seeds", "abc"], "--seeds: expected comma-separated integers >= 0 (e.g. 0,1,2), got 'abc'"),
    (["--seeds", ","], "--seeds: expected comma-separated integers >= 0 (e.g. 0,1,2), got ','"),
    (["--seeds", "0,0", "--jobs", "2"], "--seeds: seed 0 is given twice in '0,0' (its runs would share a folder)"),
    (["--jobs", "0"], "--jobs: must be at least 1, got 0"),
])
def test_bad_sweep_arguments_are_one_line(tmp_path, capsys, args, said):
    with pytest.raises(SystemExit) as e:
        main(["--out-dir", str(tmp_path), *args, str(ROOT / "conf/ablations/method/lsm.yaml")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"sweep.py: error: {said}"
    assert not any(tmp_path.iterdir())  # nothing started


def test_a_sweep_whose_runs_logged_no_loss_still_writes_its_table(tmp_path):
    """summarise over runs without a logged loss (a metrics.csv with only its header) and with one
    seed missing: the means are over what is there, the loss is NaN, and the table is written."""
    from opdlm.sweep import summarise, write_tables
    out = tmp_path / "s"
    accs = {0: (0.25, 0.20, 0.10, 0.90), 1: (0.35, 0.30, 0.20, 0.80)}
    for seed, (after, sampled, before, teacher) in accs.items():
        run = out / f"lsm_s{seed}" / "mine"
        (run / "logs" / "opd").mkdir(parents=True)
        (run / "logs" / "opd" / "metrics.csv").write_text("step,train/loss,train/grad_norm\n")
        (run / "results.json").write_text(json.dumps({
            "teacher": {"test": {"test/acc_greedy": teacher}},
            "student_before": {"test": {"test/acc_greedy": before}},
            "student_after": {"test": {"test/acc_greedy": after, "test/acc_sampled": sampled, "test/len_greedy": 10.0}}}))
    rows = summarise(out, ["lsm.yaml"], [0, 1, 2])
    (r,) = rows
    assert r["seeds"] == 2 and r["acc_greedy_mean"] == pytest.approx(30.0) and r["acc_sampled_mean"] == pytest.approx(25.0)
    assert r["acc_greedy_std"] == pytest.approx(((5.0**2 * 2) / 1) ** 0.5)
    assert r["teacher_acc_greedy"] == pytest.approx(85.0) and r["acc_before_greedy"] == pytest.approx(15.0)
    assert r["final_loss"] != r["final_loss"] and r["grad_norm_mean"] != r["grad_norm_mean"]  # NaN: nothing logged
    table = write_tables(out, rows, [0, 1, 2])
    assert "| lsm | 2 | 30.0 ± 7.1 % | 25.0 ± 7.1 % | 15.0 ± 7.1 % | 85.0 ± 7.1 % | nan |" in table
    assert (out / "results.md").is_file() and (out / "results.csv").is_file()


def _alive(marker: str) -> list[int]:
    """Pids of the processes whose command line contains ``marker``."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGKILL, -signal.SIGKILL)])
def test_runs_end_with_their_sweep(tmp_path, sig, code):
    """SIGTERM to the sweep stops its runs (each keeps its checkpoint) before it exits with 143;
    after SIGKILL, which the sweep cannot handle, the runs notice their parent is gone and stop."""
    tiny = [o for o in TINY if not o.startswith(("trainer.progress_bar", "run."))]
    cmd = [sys.executable, str(ROOT / "sweep.py"), "--name", "t", "--seeds", "0", "--out-dir", str(tmp_path),
           str(ROOT / "conf/ablations/method/lsm.yaml"), *tiny, "stages.opd.steps=400", "run.checkpoint_every=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    ckpt = tmp_path / "t" / "lsm_s0" / "demo" / "checkpoints" / "opd" / "last.ckpt"
    deadline = time.time() + 300
    while not ckpt.is_file() and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    assert ckpt.is_file(), sweep.communicate(timeout=60)
    assert _alive(str(tmp_path / "t" / "lsm_s0"))  # the run is training
    sweep.send_signal(sig)
    _, err = sweep.communicate(timeout=180)
    assert sweep.returncode == code, err[-2000:]
    deadline = time.time() + 60
    while _alive(str(tmp_path / "t" / "lsm_s0")) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(str(tmp_path / "t" / "lsm_s0"))
    log = (tmp_path / "t" / "logs" / "lsm_s0.log").read_text()
    assert log.strip().splitlines()[-1].startswith("opdlm: terminated (SIGTERM) in stage opd at optimizer step "), log[-800:]
    if sig == signal.SIGTERM:
        assert err.strip().splitlines()[-1] == ("sweep: stopped (SIGTERM); the runs in progress were stopped and keep "
                                                "their checkpoints: the same command continues them")
    assert ckpt.is_file()
