"""The benchmark commands run and print their tables (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import pytest

from opdlm.bench.cli import main

pytestmark = pytest.mark.slow  # subprocess runs: deselected by -m "not slow"


def test_align_benchmark_prints_its_table(capsys):
    assert main(["align", "--texts", "30", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| llama -> qwen |" in out and "| qwen -> llama |" in out and "target: >= 200,000" in out


def test_head_benchmark_runs_naive_and_lean(capsys):
    assert main(["head", "--tokens", "64", "--hidden", "64", "--seq", "32", "--k", "4", "--chunk", "16",
                 "--warmup", "0", "--no-demo"]) == 0
    out = capsys.readouterr().out
    assert "| B·T = 64 | naive |" in out and "| B·T = 64 | lean |" in out
    assert "lean / naive peak memory" in out


def test_bench_reports_a_missing_tokenizer_folder(tmp_path, capsys):
    assert main(["align", "--qwen", str(tmp_path)]) == 2
    assert "--qwen: no tokenizer.json" in capsys.readouterr().err


def test_scale_benchmark_runs_one_and_two_processes(capsys, tmp_path):
    assert main(["scale", "--steps", "1", "--prompts", "2", "--worlds", "1,2", f"--out={tmp_path}",
                 "sampler.max_new_tokens=8", "sampler.n=2"]) == 0
    cap = capsys.readouterr()
    rows = [line for line in cap.out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and rows[0].endswith("1.00x |"), cap.err[-3000:]
