"""Runs on several processes, from the command line: one results table, sharded evaluation that
gives the one-process numbers; the trainer node takes any lightning.Trainer argument; the stage
cache knows the code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, demo_cfg
from test_bad_input import plan_err as err
from transformers import AutoModelForCausalLM

from opdlm import fingerprint as fpmod
from opdlm.builder import build_run
from opdlm.data import EvalBatches, StepBatches, global_batch
from opdlm.errors import ConfigError
from opdlm.evaluation import evaluate
from opdlm.pipeline import Runner
from opdlm.trainer import make_trainer

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_two_process_run_prints_and_writes_one_table(tmp_path):
    over = [o for o in TINY if not o.startswith(("eval.test_prompts", "trainer.accelerator"))]
    res = run_cli(*over, f"run.out_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.devices=2",
                  "trainer.strategy=ddp", "trainer.threads=1", "eval.test_prompts=8", "stages.opd.prompts_per_step=4")
    assert res.returncode == 0, res.stderr[-4000:]
    out = res.stdout
    assert out.count("| student after OPD |") == 1 and out.count("[opdlm] stage opd:") == 1
    assert "on 2 processes" in out and "2 processes" in (tmp_path / "demo" / "results.md").read_text()
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["processes"] == 2
    # the test metrics were computed on 2 shards (batches of 4 prompts: one per rank) and summed;
    # one process evaluating the exported models gets the same numbers (seeds are per batch)
    cfg = demo_cfg(*over, "trainer.accelerator=cpu", "eval.test_prompts=8", "stages.opd.prompts_per_step=4")
    built = build_run(cfg)
    for key, folder, spec in (("teacher", "teacher", built.teacher), ("student_after", "student", built.student)):
        info = json.loads((tmp_path / "demo" / folder / "stage.json").read_text())
        (test,) = [e["test"] for e in info["evaluations"].values()]
        assert info["processes"] == 2 and test == results[key]["test"]
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / folder, local_files_only=True)
        again = evaluate(model, spec.tokenizer, built, cfg, False, "test")
        assert again == pytest.approx(test, abs=1e-12)


def test_batches_are_split_over_ranks_without_repeats():
    items = list(range(10))
    whole = [b for b in StepBatches(items, batch_size=4, steps=7, seed=7, rank=0, world=1, collate=list)]
    parts = [list(StepBatches(items, batch_size=4, steps=7, seed=7, rank=r, world=2, collate=list)) for r in (0, 1)]
    for s in range(7):
        assert parts[0][s] + parts[1][s] == whole[s]  # rank slices, in rank order, are the global batch
        assert len(set(whole[s])) == 4  # no item twice in one step (a pass's remainder is left out)
    assert global_batch(10, 4, 3, 7) == whole[3]
    # when the batch divides the split, the order is torch's RandomSampler without replacement
    import torch
    from torch.utils.data import RandomSampler
    gen = torch.Generator().manual_seed(7)
    ref = list(RandomSampler(list(range(12)), replacement=False, num_samples=36, generator=gen))
    assert [i for s in range(9) for i in global_batch(12, 4, s, 7)] == ref
    # resuming at step 2 continues with batch 2
    assert list(StepBatches(items, batch_size=4, steps=5, seed=7, rank=0, world=1, collate=list, start=lambda: 2)) == whole[2:5]
    with pytest.raises(ConfigError):
        StepBatches(items, batch_size=3, steps=1, seed=0, rank=0, world=2, collate=list)
    shards = [list(EvalBatches(items, 3, r, 2)) for r in (0, 1)]
    assert [b for b, _ in shards[0]] == [0, 2] and [b for b, _ in shards[1]] == [1, 3]
    assert sorted(i for s in shards for _, xs in s for i in xs) == items


def test_trainer_takes_any_lightning_argument(tmp_path):
    cfg = demo_cfg(*TINY, "trainer.reload_dataloaders_every_n_epochs=3", "trainer.num_nodes=1",
                   "trainer.enable_model_summary=true", f"run.out_dir={tmp_path}")
    build_run(cfg)
    trainer = make_trainer(cfg, tmp_path, "opd", 2)
    assert trainer.reload_dataloaders_every_n_epochs == 3 and trainer.num_nodes == 1
    assert "trainer.max_steps: set by opdlm; use stages.<stage>.steps" in err("trainer.max_steps=5")
    assert "trainer.gradient_clip_val: set by opdlm; use stages.<stage>.max_grad_norm" in err("trainer.gradient_clip_val=1.0")
    assert "trainer.devics: not an argument of lightning.Trainer (did you mean 'devices'?)" in err("trainer.devics=2")


def test_bad_scale_out_settings_are_one_line_errors():
    assert err("trainer.strategy=ddp_spawn", "trainer.devices=2", "trainer.accelerator=cpu").startswith(
        "trainer.strategy: 'ddp_spawn' starts new processes for every Trainer")
    assert err("trainer.strategy=bogus").startswith("trainer.strategy: ")
    assert err("trainer.accelerator=gpu").startswith("trainer.")
    cores = os.cpu_count() or 1
    assert err("trainer.accelerator=cpu", f"trainer.devices={cores + 1}", "trainer.strategy=ddp") == (
        f"trainer.devices: {cores + 1} processes on the CPU, but this machine has {cores} cores")
    if cores >= 2:
        assert err("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
                   "stages.opd.prompts_per_step=3").startswith(
            "stages.opd.prompts_per_step: 3 is the batch over all processes and must split evenly over the 2 processes")


def test_editing_a_plugin_file_recomputes_only_the_stages_that_use_it(tmp_path, capsys):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    src = (ROOT / "plugins" / "losses" / "lsm.py").read_text()
    (plugins / "lsm_copy.py").write_text(src.replace('@LOSSES.register("lsm")', '@LOSSES.register("lsm_copy")'))
    cfg = demo_cfg(*TINY, f"plugin_paths=[{plugins}]", "loss.name=lsm_copy", f"run.out_dir={tmp_path / 'runs'}")
    Runner(cfg).run()
    capsys.readouterr()
    Runner(cfg).run()
    assert capsys.readouterr().out.count("(same config and code), skipping") == 3
    (plugins / "lsm_copy.py").write_text(src.replace('@LOSSES.register("lsm")', '@LOSSES.register("lsm_copy")')
                                         + "\n# edited\n")
    Runner(cfg).run()
    out = capsys.readouterr().out
    assert out.count("(same config and code), skipping") == 2
    assert "stage opd: config or code changed" in out


def test_package_source_is_in_the_fingerprint(tmp_path, monkeypatch):
    import shutil
    copy = tmp_path / "opdlm"
    shutil.copytree(fpmod.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fpmod, "PACKAGE_DIR", copy)
    fpmod.package_digest.cache_clear()
    try:
        before = fpmod.package_digest()
        (copy / "ops" / "kl.py").write_text((copy / "ops" / "kl.py").read_text() + "\n# edited\n")
        fpmod.package_digest.cache_clear()
        assert fpmod.package_digest() != before
    finally:
        fpmod.package_digest.cache_clear()
