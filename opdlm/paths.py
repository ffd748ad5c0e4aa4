"""Where the built-in plugins and the shipped configs are: the checkout's top-level ``plugins/`` and
``conf/`` folders, or, in an installed wheel, their copies inside the package (``opdlm/builtin/``)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT = PACKAGE_DIR.parent


def _folder(name: str) -> Path:
    top = CHECKOUT / name
    if top.is_dir() and (CHECKOUT / "pyproject.toml").is_file():
        return top
    return PACKAGE_DIR / "builtin" / name


PLUGINS_DIR = _folder("plugins")
CONF_DIR = _folder("conf")
