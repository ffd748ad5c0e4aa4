"""The documented plugin example works as written (docs/plugins.md, which the README links to): it
is complete (it trains, and it is 3 x LSM, as its docstring says), and the command that uses it
runs. The other examples of that page: tests/test_docs.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, demo_cfg
from doc_examples import example_blocks, example_folder

PAGE = (ROOT / "docs" / "plugins.md").read_text()


def readme_plugin(tmp_path: Path) -> Path:
    """The page's my_plugins/ folder (scaled_lsm.py and the other examples), shared by the session."""
    assert "scaled_lsm.py" in example_blocks()
    return example_folder()


def test_readme_plugin_example_is_three_times_lsm(tmp_path):
    from opdlm.builder import build_run
    from opdlm.module import OPDModule
    from opdlm.registry import LOSSES
    folder = readme_plugin(tmp_path)
    cfg = demo_cfg(*TINY, f"plugin_paths=[{folder}]", "loss.name=scaled_lsm", "loss.scale=3", "support.k=4")
    built = build_run(cfg)
    torch.manual_seed(0)
    module = OPDModule(cfg, built=built)
    tok = built.student.tokenizer
    ex = built.task.examples("train")[:3]
    ro = built.sampler.sample(module.student, tok, [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex], ex, n=2)
    view, teacher, support, mask = module.prepare(ro)
    inputs, out, _ = module.loss_backward(ro, support, teacher, None, mask, view, mask.sum().float())
    lsm = LOSSES.build({"name": "lsm"}).compute(inputs).token_loss
    torch.testing.assert_close(out.token_loss[mask], 3 * lsm[mask])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())


@pytest.mark.slow
def test_readme_plugin_command_runs(tmp_path):
    folder = readme_plugin(tmp_path)
    (line,) = [x for x in PAGE.splitlines() if "plugin_paths=[my_plugins] loss.name=scaled_lsm" in x]
    command = re.search(r"`(python run\.py [^`]+)`", line).group(1).split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    res = subprocess.run([sys.executable, str(ROOT / "run.py"), *command[2:], *TINY, f"run.out_dir={tmp_path / 'runs'}"],
                         capture_output=True, text=True, cwd=folder.parent, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "loss scaled_lsm" in res.stdout and "| student after OPD |" in res.stdout
