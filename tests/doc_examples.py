"""What the documentation shows, read from its pages: the example plugins of docs/plugins.md and the
commands of the README and docs/*.md. Used by tests/test_docs.py and tests/test_readme.py."""

from __future__ import annotations

import atexit
import functools
import re
import shlex
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_PAGE = ROOT / "docs" / "plugins.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GPU_ONLY = "GPU only"
NEEDS_TRL = "needs TRL"  # an optional extra that CI does not install: parsed, not run


def example_blocks(page: Path = PLUGINS_PAGE) -> dict[str, str]:
    """File name -> code of every ```python block that starts with '# my_plugins/<file>.py'."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    return {m.group(1): b for b in blocks if (m := re.match(r"# my_plugins/(\w+\.py)\n", b))}


@functools.lru_cache(maxsize=1)
def example_folder() -> Path:
    """A folder holding my_plugins/ with the page's example files, one per test session: a plugin file
    imported from two folders would register its name twice."""
    top = Path(tempfile.mkdtemp(prefix="opdlm_doc_examples_"))
    atexit.register(shutil.rmtree, top, ignore_errors=True)
    folder = top / "my_plugins"
    folder.mkdir()
    for name, code in example_blocks().items():
        (folder / name).write_text(code)
    return folder


def _code_lines(text: str) -> list[str]:
    """The lines of the page's fenced code blocks, with backslash continuations joined."""
    lines: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append(pending + line)
            pending = ""
    return lines


def commands(page: Path) -> list[tuple[str, bool]]:
    """(command, not run here) for every `python run.py|sweep.py|bench.py ...` the page shows, in
    code blocks and in inline code. A command is not run here when its comment says it is GPU only
    or needs TRL."""
    text = page.read_text()
    found: list[tuple[str, bool]] = []
    for line in _code_lines(text):
        m = re.search(r"python (?:run|sweep|bench)\.py.*", line)
        if m:
            cmd, _, comment = m.group(0).partition("  #")
            found.append((cmd.strip(), GPU_ONLY in comment or NEEDS_TRL in comment))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for m in re.finditer(r"`(python (?:run|sweep|bench)\.py[^`]*)`", prose):
        found.append((" ".join(m.group(1).split()), False))
    return found


def words(command: str) -> list[str]:
    """A command's words as the shell gives them to the program (quotes removed)."""
    return shlex.split(command)
