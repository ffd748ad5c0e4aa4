"""Plugin discovery: built-in names equal file stems, extra folders, entry points, failures."""

from __future__ import annotations

import sys
import textwrap

import pytest
from conftest import ROOT, demo_cfg

from opdlm import discovery
from opdlm.errors import ConfigError
from opdlm.registry import KINDS, LOSSES, Registry


def test_builtin_plugin_names_equal_file_stems():
    for kind, (reg, folder) in KINDS.items():
        files = {p.stem for p in (ROOT / "plugins" / folder).glob("*.py") if not p.name.startswith("_")}
        builtin = {n for n in reg.names() if reg.get(n).__module__.startswith(f"opdlm_plugins.{folder}.")}
        assert files == builtin, kind
        for name in builtin:
            assert reg.get(name).__module__ == f"opdlm_plugins.{folder}.{name}"


def test_extra_plugin_folder_registers_and_is_usable(tmp_path):
    (tmp_path / "half_lsm.py").write_text(textwrap.dedent('''
        from opdlm.plugin_api import Loss
        from opdlm.registry import LOSSES
        from opdlm.types import LossOutput

        @LOSSES.register("test_half_lsm")
        class HalfLSM(Loss):
            """A user loss from an extra folder."""
            def __init__(self, *, scale: float = 0.5) -> None:
                self.scale = scale
            def compute(self, inputs):
                return LossOutput(token_loss=self.scale * inputs.student.token_logprob)
    '''))
    cfg = demo_cfg(f"plugin_paths=[{tmp_path}]", "loss.name=test_half_lsm", "loss.scale=0.25")
    assert cfg["loss"] == {"name": "test_half_lsm", "scale": 0.25}
    assert "test_half_lsm" in LOSSES


def test_plugin_that_fails_to_import_names_its_file(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import math\nraise RuntimeError('boom')\n")
    with pytest.raises(ConfigError) as e:
        demo_cfg(f"plugin_paths=[{tmp_path}]")
    assert str(e.value) == f"plugin file {bad}:2 failed to import: RuntimeError: boom"


def test_missing_plugin_folder(tmp_path):
    with pytest.raises(ConfigError, match="plugin_paths: '.*nowhere' is not a folder"):
        demo_cfg(f"plugin_paths=[{tmp_path / 'nowhere'}]")


def test_entry_point_group_is_discovered(tmp_path, monkeypatch):
    (tmp_path / "opdlm_test_ep_plugin.py").write_text(textwrap.dedent('''
        from opdlm.plugin_api import Masker
        from opdlm.registry import MASKERS

        @MASKERS.register("test_everything")
        class Everything(Masker):
            """Keeps every position (entry-point test plugin)."""
            def __init__(self) -> None:
                pass
            def mask(self, rollout, view):
                return rollout.response_mask
    '''))
    dist = tmp_path / "opdlm_test_ep-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: opdlm-test-ep\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[opdlm.plugins]\neverything = opdlm_test_ep_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    discovery.discover()
    assert "test_everything" in KINDS["masker"][0]
    sys.modules.pop("opdlm_test_ep_plugin", None)


def test_duplicate_name_names_both_modules():
    reg: Registry = Registry("loss")

    @reg.register("x")
    class A:
        pass

    with pytest.raises(ConfigError) as e:
        @reg.register("x")
        class B:
            pass
    assert "loss 'x' is registered twice" in str(e.value)
    assert "A" in str(e.value) and "B" in str(e.value)


def test_positional_constructor_arguments_are_rejected():
    reg: Registry = Registry("loss")

    @reg.register("pos")
    class P:
        """doc"""
        def __init__(self, k: int = 2) -> None:
            self.k = k

    with pytest.raises(TypeError, match="must be keyword-only"):
        reg.validate({"name": "pos"})
