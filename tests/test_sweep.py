"""The sweep runner: overlays x seeds through run.py, shared SFT stages, the comparison table."""

from __future__ import annotations

import csv
import json

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
