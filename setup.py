"""Packaging beyond what pyproject.toml can say statically: the top-level plugins/ and conf/ folders
of the checkout ship inside the package as opdlm.builtin.plugins and opdlm.builtin.conf, every
sub-folder included (a new plugin folder needs no edit here)."""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class fresh_build_py(build_py):  # noqa: N801 - setuptools command naming
    """Start from an empty build/lib/opdlm: setuptools never removes files a previous build copied
    there, so a plugin deleted from the checkout would otherwise still ship in the wheel."""

    def run(self) -> None:
        shutil.rmtree(Path(self.build_lib) / "opdlm", ignore_errors=True)
        super().run()


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
    cmdclass={"build_py": fresh_build_py},
)
