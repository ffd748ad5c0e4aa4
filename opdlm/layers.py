"""Config layers: YAML files (each with its ``base:`` files first) and ``key=value`` words, merged in
order into one tree that remembers where every key was set (``Where``: "conf/x.yaml:12" or
"command line"), so that every later error names the file and line. A layer that changes a plugin
node's ``name`` replaces the whole node, so the old plugin's options cannot leak into the new one;
a new name of the same plugin (``teacher_topk`` -> ``student_topk``: both the ``topk`` support)
keeps the node's options except those the new name sets."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opdlm.errors import ConfigError
from opdlm.registry import KINDS

#: config path -> plugin kind; a list slot holds several nodes of that kind
PLUGIN_SLOTS: dict[str, str] = {
    "task": "task",
    "sampler": "sampler",
    "aligner": "aligner",
    "support": "support",
    "loss": "loss",
}
PLUGIN_LIST_SLOTS: dict[str, str] = {"maskers": "masker"}


class Where:
    """Remembers where each key was last set ("conf/x.yaml:12" or "command line")."""

    def __init__(self) -> None:
        self.origin: dict[str, str] = {}

    def of(self, path: str) -> str:
        # the most specific recorded origin of this path or of a parent
        p = path
        while p:
            if p in self.origin:
                return self.origin[p]
            p = p.rpartition(".")[0]
        return "conf/base.yaml"

    def err(self, path: str, msg: str) -> ConfigError:
        return ConfigError(msg, key=path, origin=self.of(path))

    def locate(self, error: ConfigError) -> ConfigError:
        """The error located at the file:line or "command line" that set its key (or the key's
        nearest parent), when a layer set it."""
        p = error.key
        while p and not error.origin:
            if p in self.origin:
                return error.at(self.origin[p])
            p = p.rpartition(".")[0]
        return error


def yaml_lines(path: Path) -> dict[str, int]:
    """Dotted key -> 1-based line of a YAML file (for error messages)."""
    out: dict[str, int] = {}
    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return out

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                out[key] = k.start_mark.line + 1
                walk(v, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[f"{prefix}{i}"] = v.start_mark.line + 1
                walk(v, f"{prefix}{i}.")

    walk(root, "")
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"conf={path}: no such config file")
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"{path}: not valid YAML: {' '.join(first[:3])}") from None
    data = OmegaConf.to_container(cfg, resolve=False)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def expand_layers(confs: list[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """The config files in the order they apply: each file's ``base:`` (a path or a list of paths,
    relative to the file) first, recursively; a file that appears twice applies once, at its first
    place. So an overlay that names conf/demo.yaml as its base runs on the demo by itself."""
    out: list[tuple[Path, dict[str, Any]]] = []
    seen: set[Path] = set()

    def add(path: Path, chain: list[Path], origin: str) -> None:
        key = path.resolve()
        if key in [c.resolve() for c in chain]:
            raise ConfigError(f"{origin}: circular ({' -> '.join(str(c) for c in [*chain, path])})")
        if chain and not path.is_file():
            raise ConfigError(f"{origin}: no such config file '{path}'")
        layer = load_yaml(path)
        bases = layer.pop("base", None)
        if bases is not None:
            if isinstance(bases, str):
                bases = [bases]
            if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
                raise ConfigError(f"{path}:{yaml_lines(path).get('base', 1)}: base: expected a path or a list of paths, got {bases!r}")
            for b in bases:
                add(path.parent / b, [*chain, path], f"{path}:{yaml_lines(path).get('base', 1)}: base")
        if key not in seen:
            seen.add(key)
            out.append((path, layer))

    for c in confs:
        add(Path(c), [], f"conf={c}")
    return out


def parse_value(text: str) -> Any:
    """Parse the right-hand side of key=value like YAML (numbers, booleans, null, [lists]);
    ValueError (what the YAML parser said, in one line) when it is not valid YAML."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except OmegaConfBaseException:
        return text
    except yaml.YAMLError as e:
        said = " ".join(x.strip() for x in str(e).splitlines() if x.strip() and "<unicode string>" not in x)
        raise ValueError(said or type(e).__name__) from None


def slot_kind(path: str) -> tuple[str, bool] | None:
    """(kind, is_list) for a plugin slot path; an item of a list slot ("maskers.1") is a slot."""
    if path in PLUGIN_SLOTS:
        return PLUGIN_SLOTS[path], False
    if path in PLUGIN_LIST_SLOTS:
        return PLUGIN_LIST_SLOTS[path], True
    head, _, idx = path.rpartition(".")
    if head in PLUGIN_LIST_SLOTS and idx.isdigit():
        return PLUGIN_LIST_SLOTS[head], False
    return None


def merge(dst: dict[str, Any], src: Mapping[str, Any], prefix: str, where: Where, origin: str,
           lines: dict[str, int]) -> None:
    for k, v in src.items():
        path = f"{prefix}{k}"
        where.origin[path] = f"{origin}:{lines[path]}" if path in lines else origin
        slot = slot_kind(path)
        cur = dst.get(k)
        if slot:  # remember where each option of a plugin node was written
            for sub, line in lines.items():
                if sub.startswith(path + "."):
                    where.origin[sub] = f"{origin}:{line}"
        if slot and not slot[1] and isinstance(v, Mapping) and isinstance(cur, Mapping):
            if "name" in v and v["name"] != cur.get("name"):  # a new plugin replaces the whole node
                dst[k] = {**kept_options(slot[0], cur, v["name"]), **copy.deepcopy(dict(v))}
            else:
                merged = dict(cur)
                merged.update(copy.deepcopy(dict(v)))
                dst[k] = merged
        elif isinstance(v, Mapping) and isinstance(cur, Mapping) and not slot:
            merge(cur, v, path + ".", where, origin, lines)
        else:
            dst[k] = copy.deepcopy(v)


def set_path(cfg: dict[str, Any], path: str, value: Any, where: Where) -> None:
    parts = path.split(".")
    node: Any = cfg
    for i, part in enumerate(parts[:-1]):
        sub = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"command line: {path}: index {part} is out of range for {sub.rpartition('.')[0]} (length {len(node)})")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"command line: {path}: {sub} is a value, not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"command line: {path}: index {last} is out of range (length {len(node)})")
        node[int(last)] = value
        return
    slot_path = ".".join(parts[:-1])
    slot = slot_kind(slot_path)
    if last == "name" and slot and not slot[1] and node.get("name") != value:
        kept = kept_options(slot[0], node, value)
        node.clear()  # changing the plugin drops the old plugin's options
        node.update(kept)
    node[last] = value


def kept_options(kind: str, node: Mapping[str, Any], new_name: Any) -> dict[str, Any]:
    """The options of a plugin ``node`` that survive a change of its name to ``new_name``: none for
    another plugin; for another name of the same plugin (an alias), all but those the new name sets."""
    reg = KINDS[kind][0]
    old, new = reg.resolve(node.get("name")), reg.resolve(new_name)
    if old[0] is None or old[0] != new[0]:
        return {}
    return {k: copy.deepcopy(v) for k, v in node.items() if k != "name" and k not in new[1]}


def mark_new_prefixes(cfg: dict[str, Any], key: str, where: Where) -> None:
    """A key=value that creates new parent keys is where those parents were set."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            for j in range(i, len(parts)):
                where.origin[".".join(parts[: j + 1])] = "command line"
            return
