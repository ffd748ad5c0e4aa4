"""MkDocs hook: the Configuration page's key tables, rendered from conf/base.yaml at build time.

conf/base.yaml holds every framework key with a comment on it, so the page is made from that file
and cannot drift from it. The page (docs/configuration.md) holds the marker ``MARKER``; the hook
replaces it with one table per top-level section: each key's dotted path, its default and its
comment. A key's comment is its inline comment plus the comment lines below it that are indented
past the key; comment lines at or left of the next key's indentation introduce that key.

``render(path)`` is plain Python (no MkDocs import), so tests/test_docs.py checks the same output.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import yaml

BASE = Path(__file__).resolve().parent.parent / "conf" / "base.yaml"
MARKER = "<!-- base.yaml keys -->"
PAGE = "configuration.md"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?P<rest>.*)$")
_ITEM = re.compile(r"^(?P<indent> *)- (?P<rest>.*)$")
_COMMENT = re.compile(r"^(?P<indent> *)#\s?(?P<text>.*)$")


def _split_comment(rest: str) -> tuple[str, str]:
    """(value text, inline comment) of what follows ``key:`` (base.yaml quotes no '#')."""
    value, sep, comment = rest.partition(" #")
    if not sep and rest.lstrip().startswith("#"):
        return "", rest.lstrip()[1:].strip()
    return value.strip(), comment.strip()


def parse(path: Path = BASE) -> tuple[list[str], list[dict[str, Any]]]:
    """(the file's header comment lines, one entry per key in file order). An entry holds ``path``
    (dotted), ``depth``, ``intro`` (the comment lines above it) and ``doc`` (its own comment).
    A block list's items belong to the list's key: their comments are added to its ``doc``."""
    header: list[str] = []
    entries: list[dict[str, Any]] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    pending: list[str] = []  # comment lines waiting for the next key
    last: dict[str, Any] | None = None  # the key whose comment continues below it
    last_indent = -1
    seen_key = False
    for raw in path.read_text().splitlines():
        if not raw.strip():
            if not seen_key and pending:
                header, pending = header + pending, []
            continue
        m = _COMMENT.match(raw)
        if m:
            if last is not None and len(m["indent"]) > last_indent:
                last["doc"].append(m["text"].strip())
            else:
                last = None
                pending.append(m["text"].strip())
            continue
        m = _ITEM.match(raw)
        if m and last is not None:  # an item of a block list: its comment belongs to the list's key
            _, comment = _split_comment(m["rest"])
            if comment:
                last["doc"].append(comment)
            continue
        m = _KEY.match(raw)
        if not m:
            raise ValueError(f"{path}: cannot read line {raw!r}")
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [m["key"]])
        _, comment = _split_comment(m["rest"])
        if not seen_key:
            header, pending = header + pending, []
        seen_key = True
        entry = {"path": dotted, "depth": len(stack), "intro": pending, "doc": [comment] if comment else []}
        entries.append(entry)
        pending = []
        stack.append((indent, m["key"]))
        last, last_indent = entry, indent
    return header, entries


def _value(node: Any) -> str:
    """A default as YAML flow text."""
    if node is None:
        return "null"
    if isinstance(node, bool):
        return "true" if node else "false"
    if isinstance(node, str):
        return node if node else '""'
    if isinstance(node, (int, float)):
        return repr(node)
    if isinstance(node, list):
        return "[" + ", ".join(_value(v) for v in node) + "]"
    if isinstance(node, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in node.items()) + "}"
    return json.dumps(node)


def _cell(text: str) -> str:
    """Plain text safe inside a Markdown table cell (no HTML, emphasis, links or column breaks)."""
    text = html.escape(text, quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _one_part_apart(a: str, b: str) -> bool:
    """Whether two dotted paths of the same length differ in exactly one part (not the last)."""
    x, y = a.split("."), b.split(".")
    return len(x) == len(y) and x[-1] == y[-1] and sum(p != q for p, q in zip(x, y)) == 1


def render(path: Path = BASE) -> str:
    """Markdown: one table per top-level section of base.yaml (key, default, meaning)."""
    header, entries = parse(path)
    tree = yaml.safe_load(path.read_text())
    out: list[str] = []
    if header:
        out += ["The file opens with:", "", *(f"> {_cell(line)}" for line in header), ""]
    rows: list[str] = []

    def flush() -> None:
        if rows:
            out.extend(["| key | default | meaning |", "|---|---|---|", *rows, ""])
            rows.clear()

    documented = {e["path"]: e["doc"] for e in entries if e["doc"]}
    for e in entries:
        value = _lookup(tree, e["path"])
        mapping = isinstance(value, dict) and bool(value)
        if e["depth"] == 0:
            flush()
            out += [f"### `{e['path']}`", ""]
            if e["intro"] or (mapping and e["doc"]):
                out += [_cell(" ".join(e["intro"] + (e["doc"] if mapping else []))), ""]
            if mapping:
                continue
        elif e["intro"]:
            e["doc"] = e["intro"] + e["doc"]
        doc = _cell(" ".join(e["doc"]))
        if not doc:  # student.path as teacher.path, stages.opd.lr as stages.teacher_sft.lr
            like = next((p for p in documented if _one_part_apart(p, e["path"])), None)
            doc = f"as `{like}`" if like else ""
        shown = "" if mapping else f"`{_value(value)}`"
        rows.append(f"| `{e['path']}` | {shown} | {doc} |")
    flush()
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: fill the Configuration page's marker with the tables."""
    if page.file.src_uri == PAGE:
        if MARKER not in markdown:
            raise ValueError(f"docs/{PAGE} has lost its marker {MARKER!r}")
        return markdown.replace(MARKER, render())
    return markdown
