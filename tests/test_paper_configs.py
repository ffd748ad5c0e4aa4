"""conf/paper/ passes --check with stand-in local folders the test builds (the real Qwen tokenizer
and output size, tiny random weights, a local DAPO-style jsonl), and resolves to the paper's
numbers."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import ROOT
from test_xtok_examples import model_folder

from opdlm.cli import main


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    data = root / "dapo.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Compute {i}+{i}.", "answer": str(2 * i)}) for i in range(40)))
    qwen = model_folder(root, "qwen")
    return {"model": qwen, "data": data}


@pytest.mark.parametrize("conf", ["math_lsm.yaml", "math_sampled_token.yaml"])
def test_paper_configs_pass_check(conf, stand_ins, capsys):
    args = [f"conf={ROOT / 'conf' / 'paper' / conf}", f"teacher.path={stand_ins['model']}",
            f"student.path={stand_ins['model']}", f"task.path={stand_ins['data']}", "--check"]
    assert main(args) == 0, capsys.readouterr().err
    cfg = yaml.safe_load(capsys.readouterr().out)
    opd = cfg["stages"]["opd"]
    assert (cfg["support"].get("k"), cfg["sampler"]["n"], opd["prompts_per_step"], opd["num_mini_batches"]) == (
        32 if conf == "math_lsm.yaml" else None, 8, 16, 2)
    assert (opd["lr"], opd["betas"], opd["weight_decay"], opd["loss_aggregation"]) == (2e-6, [0.9, 0.999], 0.01,
                                                                                        "token_mean")
    assert opd["steps"] // opd["num_mini_batches"] == 400 and cfg["sampler"]["max_new_tokens"] == 16384
    if conf == "math_lsm.yaml":
        assert cfg["loss"]["name"] == "lsm" and cfg["sampler"]["top_p"] == 0.9
        assert cfg["maskers"][0]["tokens"] == ["<", "think", "<|im_end|>"]
    else:
        assert cfg["loss"]["name"] == "sampled_token" and cfg["sampler"]["top_p"] == 1.0 and cfg["maskers"] == []
