"""The built wheel works on its own: installed (not editable) into a fresh virtual environment and
run from a folder outside the checkout, `opdlm --list` shows every built-in plugin and `opdlm
--check` resolves the demo config from the copies the wheel ships; a third-party package that
declares the `opdlm.plugins` entry point is found the same way.

The fresh environment gets opdlm's dependencies through a .pth file naming this environment's
site-packages (so nothing is downloaded again); this environment's editable install is not active
there (a .pth file inside an added folder is not read)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # subprocess runs: deselected by -m "not slow"


def pip_wheel(src: Path, out: Path, name: str) -> Path:
    """Build ``src``'s wheel into ``out`` (with this environment's setuptools when it is recent
    enough for the project's metadata, else in pip's own isolated build environment)."""
    import setuptools
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)]
    if int(setuptools.__version__.split(".")[0]) >= 77:
        cmd.append("--no-build-isolation")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (whl,) = out.glob(f"{name}-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    wheels = root / "wheels"
    whl = pip_wheel(ROOT, wheels, "opdlm")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_opdlm_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(whl)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    away = root / "elsewhere"
    away.mkdir()
    return {"root": root, "venv": venv, "py": py, "away": away, "wheels": wheels}


def opdlm(env: dict, *args: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPDLM_PLUGIN_PATH")}
    return subprocess.run([str(env["venv"] / "bin" / "opdlm"), *args], capture_output=True, text=True,
                          cwd=env["away"], env=e, timeout=600)


def test_the_installed_wheel_lists_every_builtin_plugin_and_checks_the_demo(fresh_env):
    where = subprocess.run([str(fresh_env["py"]), "-c", "import opdlm; print(opdlm.__file__)"], capture_output=True,
                           text=True, cwd=fresh_env["away"], check=True).stdout.strip()
    assert where.startswith(str(fresh_env["venv"])), where  # the wheel's copy, not the checkout
    listed = opdlm(fresh_env, "--list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    builtin = sorted(p.stem for p in (ROOT / "plugins").rglob("*.py") if not p.name.startswith("_"))
    assert len(builtin) > 20  # a plugin's registered name is its file's name
    for name in builtin:
        assert f"\n  {name} " in listed.stdout, name
    checked = opdlm(fresh_env, "--check")
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "name: demo" in checked.stdout and "opdlm/builtin/conf/demo.yaml composes" in checked.stderr
    overlay = opdlm(fresh_env, "--check", f"conf={Path(where).parent / 'builtin/conf/ablations/k/4.yaml'}")
    assert overlay.returncode == 0 and "name: demo" in overlay.stdout


def test_a_third_party_entry_point_plugin_is_found(fresh_env):
    pkg = fresh_env["root"] / "opdlm-thirdparty-demo"
    (pkg / "opdlm_thirdparty_demo").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "opdlm-thirdparty-demo"\nversion = "0.0.1"\n\n'
        '[project.entry-points."opdlm.plugins"]\nthirdparty = "opdlm_thirdparty_demo.losses"\n')
    (pkg / "opdlm_thirdparty_demo" / "__init__.py").write_text("")
    (pkg / "opdlm_thirdparty_demo" / "losses.py").write_text(
        "from opdlm.plugin_api import Loss\nfrom opdlm.registry import LOSSES\n\n\n"
        "@LOSSES.register('thirdparty_loss')\nclass ThirdParty(Loss):\n"
        "    \"\"\"A loss from an installed package.\"\"\"\n\n    def compute(self, inputs):\n        raise NotImplementedError\n")
    whl = pip_wheel(pkg, fresh_env["wheels"], "opdlm_thirdparty_demo")
    res = subprocess.run([str(fresh_env["py"]), "-m", "pip", "install", "--no-deps", "-q", str(whl)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    listed = opdlm(fresh_env, "--list")
    assert listed.returncode == 0 and "thirdparty_loss" in listed.stdout and "A loss from an installed package." in listed.stdout
