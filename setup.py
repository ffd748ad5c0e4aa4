"""Packaging beyond what pyproject.toml can say statically: the top-level plugins/ and conf/ folders
of the checkout ship inside the package as opdlm.builtin.plugins and opdlm.builtin.conf, every
sub-folder included (a new plugin folder needs no edit here)."""

from pathlib import Path

from setuptools import find_packages, setup


def mapped(src: str, package: str) -> dict[str, str]:
    """{package name: folder} for ``src`` and each of its sub-folders."""
    root = Path(src)
    folders = [root, *sorted(p for p in root.rglob("*") if p.is_dir() and "__pycache__" not in p.parts)]
    return {".".join([package, *f.relative_to(root).parts]): f.as_posix() for f in folders}


DATA = {**mapped("plugins", "opdlm.builtin.plugins"), **mapped("conf", "opdlm.builtin.conf")}

setup(
    packages=[*find_packages(include=["opdlm", "opdlm.*"]), *DATA],
    package_dir=DATA,
    package_data={name: ["*.py", "*.yaml"] for name in DATA},
)
