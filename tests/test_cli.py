"""run.py's command line: --check on every shipped YAML, --list, --help, errors."""

from __future__ import annotations

import pytest
from conftest import ROOT

from opdlm.cli import main
from opdlm.registry import KINDS

#: conf/examples/ and conf/paper/ read real model folders: tests/test_xtok_examples.py and
#: tests/test_paper_configs.py check them with stand-in folders holding the real tokenizers
#: (conf/base.yaml, the defaults for real models, is not an experiment of its own: tests/test_defaults.py)
CONFS = sorted(p for p in (ROOT / "conf").rglob("*.yaml") if not {"examples", "paper"} & set(p.parts)
               and p.name != "base.yaml")


#: the demos that play text games: --check generates their games (hundreds of seconds for the real
#: counts), so the test shrinks them to a few, in a folder of its own
FEW_GAMES = {
    "demo_agent.yaml": ["task.env.n_train=8", "task.env.n_val=1", "task.env.n_test=2"],
    "demo_multitask.yaml": ["tasks.1.env.n_train=8", "tasks.1.env.n_val=1", "tasks.1.env.n_test=2"],
}
SMALL_BATCHES = ["stages.teacher_sft.batch_size=8", "stages.student_sft.batch_size=8", "stages.opd.prompts_per_step=8"]


@pytest.mark.parametrize("conf", [pytest.param(c, marks=pytest.mark.slow) if c.name in FEW_GAMES else c for c in CONFS],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_conf_passes_check(conf, capsys, tmp_path):
    extra = []
    if conf.name in FEW_GAMES:
        pytest.importorskip("textworld")
        cache = "task.env.cache_dir" if conf.name == "demo_agent.yaml" else "tasks.1.env.cache_dir"
        extra = [*FEW_GAMES[conf.name], *SMALL_BATCHES, f"{cache}={tmp_path}"]
    assert main(["--check", f"conf={conf}", *extra]) == 0
    out = capsys.readouterr().out
    assert "loss:" in out and "sampler:" in out


def test_check_without_conf_uses_demo_and_prints_resolved_yaml(capsys):
    assert main(["--check", "support.k=4"]) == 0
    out = capsys.readouterr().out
    assert "name: demo" in out
    assert "k: 4" in out


def test_check_config_error_is_one_line(capsys):
    assert main(["--check", "loss.name=lsn"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("opdlm: config error: command line: loss.name: unknown loss 'lsn' (did you mean 'lsm'?); "
                   f"choices: {', '.join(KINDS['loss'][0].names())}")


def test_list_shows_every_plugin(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for kind, (reg, _) in KINDS.items():
        assert f"{kind}:" in out
        for name in reg.names():
            assert f"  {name} " in out


def test_help_and_unknown_flag(capsys):
    assert main(["--help"]) == 0
    assert "usage: python run.py" in capsys.readouterr().out
    assert main(["--frobnicate"]) == 2
    assert "unknown flag --frobnicate" in capsys.readouterr().err


def test_build_errors_name_the_layer_that_set_the_key(tmp_path, capsys):
    f = tmp_path / "x.yaml"
    f.write_text("run:\n  name: x\nsupport:\n  k: 0\n")
    assert main(["--check", f"conf={f}"]) == 2
    assert capsys.readouterr().err.strip() == f"opdlm: config error: {f}:4: support.k: must be >= 1, got 0"
    assert main(["--check", "sampler.top_p=1.5"]) == 2
    assert capsys.readouterr().err.strip() == "opdlm: config error: command line: sampler.top_p: must be in (0, 1], got 1.5"
    assert main(["--check", "support.k=1"]) == 2  # a cross-plugin check, still located
    assert capsys.readouterr().err.strip().startswith("opdlm: config error: command line: support.k: loss 'lsm' needs")
