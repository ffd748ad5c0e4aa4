"""The benchmark commands run and print their tables (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from opdlm.bench.cli import main
from opdlm.bench.step import CONFIGS as STEP_CONFIGS

pytestmark = pytest.mark.slow  # subprocess runs: deselected by -m "not slow"


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
    assert main(["head", "--tokens", "256", "--hidden", "32", "--k", "4", "--chunk", "64", "--no-demo",
                 "--naive-max", "0"]) == 0
    out = capsys.readouterr().out
    assert "| B·T = 256 | lean |" in out


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
    (["step", "--configs", "reverse_kl"], "--configs: 'reverse_kl': expected LOSS:HEAD with HEAD naive or lean, "
                                          "e.g. reverse_kl:lean"),
    (["step", "--student-hidden", "30"], "--student-hidden 30 must be a multiple of --student-heads 4, an even number "
                                         "(two key-value heads)"),
    (["step", "--rounds", "0"], "--rounds: must be at least 1, got 0"),
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


#: flags appended to a documented command (argparse: the last value wins) so that it runs the same
#: path at the smallest sizes; its own flags (--loss, --compare, --no-demo, --conf, --worlds, ...) stay
SHRINK = {
    "head": ["--tokens", "64", "--hidden", "32", "--seq", "32", "--k", "4", "--chunk", "16", "--repeats", "1",
             "--warmup", "0", "--naive-max", "64"],
    "align": ["--texts", "30", "--repeats", "1"],
    "scale": ["--steps", "1", "--prompts", "2", "sampler.max_new_tokens=8", "sampler.n=2"],
    "rollout": ["--prompts", "2", "--samples", "2", "--new-tokens", "6", "--prompt-len", "8", "--check-rows", "4"],
    "served": ["--steps", "1", "--prompts", "2", "--samples", "2", "--new-tokens", "8"],
    "estimators": ["--lengths", "2", "--seeds", "0", "--ks", "2"],
    "step": ["--rounds", "1", "--warmup", "0", "--prompts", "2", "--new-tokens", "4", "--student-hidden", "32",
             "--teacher-hidden", "32", "--student-layers", "1", "--teacher-layers", "1", "--k", "4", "--chunk", "4"],
}
#: a config's own models (bench.py head --conf): their overrides, at the smallest sizes
CONF_SHRINK = ["stages.opd.prompts_per_step=1", "sampler.n=1", "sampler.max_new_tokens=8", "prepare.1.layers=1"]


def documented_bench_commands() -> list[list[str]]:
    """The argument lists of every bench.py command the README and the docs show (GPU-only ones and
    those that need TRL left out), each once."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_docs import shown_commands, words
    out: list[list[str]] = []
    for _, cmd, gpu in shown_commands():
        w = words(cmd)
        if w[:2] == ["python", "bench.py"] and not gpu and w[2:] not in out:
            out.append(w[2:])
    return out


def shrunk(argv: list[str], tmp: str) -> list[str]:
    """A documented command with SHRINK's flags appended (its key=value overrides last), its outputs
    under ``tmp``."""
    name = argv[0]
    words = [a.replace("docs/estimator_study.png", f"{tmp}/study.png") for a in argv]
    given = [a for a in words if "=" in a and not a.startswith("-")]  # key=value overrides go last
    flags = [a for a in words if a not in given]
    more = [a for a in SHRINK[name] if "=" in a and not a.startswith("-")]
    args = [*flags, *(a for a in SHRINK[name] if a not in more), *given, *more]
    if name == "scale":
        args.insert(1, f"--out={tmp}/scale")
    if "--conf" in args:
        args += [*CONF_SHRINK, f"run.out_dir={tmp}/runs"]
    return args


def _effective(argv: list[str]) -> tuple:
    """What a shrunk command runs: its parsed options (two documented commands that differ only in
    flags SHRINK sets run the same thing)."""
    from opdlm.bench.cli import parser
    return tuple(sorted((k, str(v)) for k, v in vars(parser().parse_args(shrunk(argv, "T"))).items()))


def distinct_documented_commands() -> list[list[str]]:
    """documented_bench_commands without those that run the same thing as an earlier one once shrunk."""
    out, keys = [], set()
    for argv in documented_bench_commands():
        key = _effective(argv)
        if key not in keys:
            keys.add(key)
            out.append(argv)
    return out


def test_every_documented_bench_subcommand_is_run():
    assert {a[0] for a in documented_bench_commands()} == set(SHRINK)


@pytest.mark.parametrize("argv", [pytest.param(a, id=" ".join(a)) for a in distinct_documented_commands()])
def test_every_documented_bench_command_runs_and_prints_its_table(tmp_path, capsys, monkeypatch, argv):
    """Each bench.py command of the README and the docs, with its documented flags, at the smallest
    sizes: it exits 0 and prints a table with rows."""
    from conftest import ROOT
    monkeypatch.chdir(tmp_path)  # (a command's relative outputs land here)
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    name = argv[0]
    rc = main(shrunk(argv, str(tmp_path)))
    cap = capsys.readouterr()
    assert rc == 0, (argv, cap.err[-2000:])
    rows = [x for x in cap.out.splitlines() if x.startswith("| ") and not x.startswith("|---")]
    assert "|---" in cap.out and len(rows) >= 2, (argv, cap.out[-2000:])  # a header and at least one row
    if name == "align":
        assert "| llama -> qwen |" in cap.out and "| qwen -> llama |" in cap.out and "target: >= 200,000" in cap.out
    if name == "scale":  # a row per process count asked for, the first the speed-up's unit
        worlds = argv[argv.index("--worlds") + 1].split(",") if "--worlds" in argv else ["1", "2"]
        assert [r.split("|")[1].strip() for r in rows[1:]] == worlds and rows[1].endswith("1.00x |"), cap.out
        assert ("| ModelParallel |" in rows[-1]) == ("trainer.strategy=model_parallel" in argv), cap.out
    if name == "step":  # a row per configuration, opdlm's four by default
        configs = argv[argv.index("--configs") + 1].split(",") if "--configs" in argv else list(STEP_CONFIGS)
        assert len(rows) == 1 + len(configs), cap.out
    if name == "head" and "--no-demo" in argv:  # both heads at the asked size, and the lean/naive ratios
        assert "| B·T = 64 | naive |" in cap.out and "| B·T = 64 | lean |" in cap.out
        assert "lean / naive peak memory" in cap.out


#: a Python with TRL installed (an optional extra, not in CI): OPDLM_TRL_PYTHON, or this one if it has TRL
TRL_PYTHON = os.environ.get("OPDLM_TRL_PYTHON") or (sys.executable if importlib.util.find_spec("trl") else None)


def test_step_benchmark_names_a_failing_configuration(tmp_path, capsys):
    argv = ["step", "--configs", "lsm:lean,lsn:lean", *SHRINK["step"], "--out", str(tmp_path)]
    assert main(argv) == 1
    cap = capsys.readouterr()
    assert "| opdlm lsm, lean head |" in cap.out  # the configuration that ran is in the table
    err = cap.err.strip().splitlines()[-1]
    assert err.startswith("bench.py step: 1 measurement(s) failed, the first: lsn:lean: ") and "unknown loss 'lsn'" in err


@pytest.mark.skipif(TRL_PYTHON is not None, reason="TRL is installed here")
def test_step_benchmark_without_trl_is_one_line(tmp_path, capsys):
    assert main(["step", "--trl", *SHRINK["step"], "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"bench.py step: --trl: TRL is not importable by {sys.executable} (pip install trl==1.16.0 into that "
        "environment, or give --trl-python)")


@pytest.mark.skipif(TRL_PYTHON is None, reason="TRL is not installed (optional; OPDLM_TRL_PYTHON names a Python with it)")
def test_step_benchmark_runs_trls_trainers_on_the_same_models(tmp_path, capsys):
    assert main(["step", "--trl", "--trl-python", TRL_PYTHON, "--configs", "reverse_kl:lean", *SHRINK["step"],
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("| opdlm reverse_kl, lean head |", "| TRL DistillationTrainer (β = 1, chunked) |", "| TRL GKDTrainer (β = 1) |"):
        assert row in out, out
    assert "opdlm reverse_kl, lean head: step time / TRL DistillationTrainer's" in out
