"""run.py's command line: --check on every shipped YAML, --list, --help, errors."""

from __future__ import annotations

import pytest
from conftest import ROOT

from opdlm.cli import main
from opdlm.registry import KINDS

CONFS = sorted((ROOT / "conf").rglob("*.yaml"))


@pytest.mark.parametrize("conf", CONFS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_conf_passes_check(conf, capsys):
    assert main(["--check", f"conf={conf}"]) == 0
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
