"""The benchmark commands run and print their tables (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import pytest
import torch

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


def test_head_benchmark_times_a_configs_own_models(capsys):
    assert main(["head", "--conf", "conf/demo.yaml", "stages.opd.prompts_per_step=2", "sampler.max_new_tokens=8"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| demo |")]
    assert len(rows) == 2 and "| naive |" in rows[0] and "| lean |" in rows[1]
    cells = [c.strip() for c in rows[1].strip("|").split("|")]
    assert "nan" not in (cells[4], cells[-1])  # the yardsticks were measured: plain forward, plain forward+backward
    assert "config conf/demo.yaml" in out


def test_head_benchmark_overrides_need_a_conf(capsys):
    assert main(["head", "stages.opd.lr=1"]) == 2
    assert "key=value overrides go with --conf FILE" in capsys.readouterr().err


def test_bench_reports_a_missing_tokenizer_folder(tmp_path, capsys):
    assert main(["align", "--qwen", str(tmp_path)]) == 2
    assert "--qwen: no tokenizer.json" in capsys.readouterr().err


def test_scale_benchmark_runs_one_and_two_processes(capsys, tmp_path):
    assert main(["scale", "--steps", "1", "--prompts", "2", "--worlds", "1,2", f"--out={tmp_path}",
                 "sampler.max_new_tokens=8", "sampler.n=2"]) == 0
    cap = capsys.readouterr()
    rows = [line for line in cap.out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and rows[0].endswith("1.00x |"), cap.err[-3000:]


def test_rollout_benchmark_measures_top_p_against_the_trainer(capsys):
    assert main(["rollout", "--samplers", "top_p", "--prompts", "2", "--samples", "2", "--new-tokens", "6",
                 "--prompt-len", "8", "--check-rows", "4"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| top_p |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[3].replace(",", "")) == 2 * 2 * 6  # random weights: no response ends early here
    # top_p's behaviour log-probs are its model's: the recomputation agrees to float rounding
    assert float(cells[5]) < 1e-5 and float(cells[6]) < 1e-4


def test_rollout_benchmark_names_a_missing_engine(capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert main(["rollout", "--samplers", "vllm", "--prompts", "1", "--samples", "1", "--new-tokens", "2"]) == 2
    assert 'bench.py rollout: sampler: the vllm package is not installed: pip install "opdlm[vllm]"' in capsys.readouterr().err


def test_served_benchmark_times_the_served_teacher_against_the_in_process_one(capsys):
    """(The benchmark itself checks, every step, that the served token log-probs are the in-process ones.)"""
    assert main(["served", "--steps", "1", "--prompts", "2", "--samples", "2", "--new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| in process |", "| served |"))]
    assert len(rows) == 2
    served = rows[1].split("|")
    assert float(served[3]) > 0 and float(served[4]) > 0 and int(served[7].replace(",", "")) > 0
    assert int(served[8]) == 1  # 4 rollouts, 16 rows per request
    assert "of the in-process step" in out
    assert "in-process models on cpu" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the option runs")
def test_served_benchmark_on_a_missing_gpu_is_one_line(capsys):
    assert main(["served", "--device", "cuda", "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == "bench.py served: --device cuda: no CUDA GPU is visible to torch here"


def test_head_benchmark_at_its_default_sequence_length_fits_its_models(capsys):
    """--seq 256 (the default) plus the prompt needs more than 256 positions: the models are sized for it."""
    assert main(["head", "--tokens", "256", "--hidden", "32", "--k", "4", "--chunk", "64", "--no-demo"]) == 0
    out = capsys.readouterr().out
    assert "| B·T = 256 | naive |" in out and "| B·T = 256 | lean |" in out


def test_a_benchmark_whose_cases_fail_exits_non_zero_and_says_why(capsys):
    assert main(["head", "--tokens", "64", "--hidden", "32", "--seq", "32", "--k", "4", "--loss", "lsn", "--no-demo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bench.py head: 2 case(s) failed, the first: case naive:64: ") and "unknown loss 'lsn'" in err
    assert main(["scale", "--steps", "1", "--prompts", "2", "--worlds", "1", "sampler.nn=2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bench.py scale: 1 case(s) failed, the first: 1 processes: ") and "sampler.nn" in err


@pytest.mark.parametrize("argv, said", [
    (["head", "--k", "0"], "--k: must be at least 1, got 0"),
    (["head", "--tokens", "1024,x"], "--tokens: expected comma-separated integers, got '1024,x'"),
    (["scale", "--worlds", "0"], "--worlds: every value must be at least 1, got 0"),
    (["scale", "--worlds", "1,,2"], "--worlds: expected comma-separated integers, got '1,,2'"),
    (["estimators", "--lengths", "abc"], "--lengths: expected comma-separated integers, got 'abc'"),
    (["head", "--warmup", "-1"], "--warmup: must be at least 0, got -1"),
])
def test_bad_benchmark_arguments_are_one_line(capsys, argv, said):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"bench.py: error: {said}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("name", ["head", "rollout"])
def test_a_cuda_benchmark_without_cuda_is_one_line(capsys, name):
    assert main([name, "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == f"bench.py {name}: --device cuda: no CUDA GPU is visible to torch here"
