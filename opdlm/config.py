"""Compose a run configuration: conf/base.yaml <- conf=FILE(s) <- key=value overrides.

Every key must exist in conf/base.yaml (framework keys) or in the constructor of the plugin a node
names (plugin nodes); values are type-checked; a layer that changes a plugin node's ``name``
replaces the whole node so that the old plugin's options cannot leak into the new one. Errors are
one-line ConfigErrors naming the key, the file and line where it was set, and the valid choices.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opdlm.discovery import discover
from opdlm.errors import ConfigError
from opdlm.paths import CONF_DIR as _CONF_DIR
from opdlm.registry import KINDS
from opdlm.schema import did_you_mean, nonfinite

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = _CONF_DIR
BASE_FILE = CONF_DIR / "base.yaml"
DEFAULT_CONF = CONF_DIR / "demo.yaml"

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


def _yaml_lines(path: Path) -> dict[str, int]:
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
                raise ConfigError(f"{path}:{_yaml_lines(path).get('base', 1)}: base: expected a path or a list of paths, got {bases!r}")
            for b in bases:
                add(path.parent / b, [*chain, path], f"{path}:{_yaml_lines(path).get('base', 1)}: base")
        if key not in seen:
            seen.add(key)
            out.append((path, layer))

    for c in confs:
        add(Path(c), [], f"conf={c}")
    return out


def parse_value(text: str) -> Any:
    """Parse the right-hand side of key=value like YAML (numbers, booleans, null, [lists])."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except OmegaConfBaseException:
        return text


def _slot_kind(path: str) -> tuple[str, bool] | None:
    """(kind, is_list) for a plugin slot path; an item of a list slot ("maskers.1") is a slot."""
    if path in PLUGIN_SLOTS:
        return PLUGIN_SLOTS[path], False
    if path in PLUGIN_LIST_SLOTS:
        return PLUGIN_LIST_SLOTS[path], True
    head, _, idx = path.rpartition(".")
    if head in PLUGIN_LIST_SLOTS and idx.isdigit():
        return PLUGIN_LIST_SLOTS[head], False
    return None


def _merge(dst: dict[str, Any], src: Mapping[str, Any], prefix: str, where: Where, origin: str,
           lines: dict[str, int]) -> None:
    for k, v in src.items():
        path = f"{prefix}{k}"
        where.origin[path] = f"{origin}:{lines[path]}" if path in lines else origin
        slot = _slot_kind(path)
        cur = dst.get(k)
        if slot:  # remember where each option of a plugin node was written
            for sub, line in lines.items():
                if sub.startswith(path + "."):
                    where.origin[sub] = f"{origin}:{line}"
        if slot and not slot[1] and isinstance(v, Mapping) and isinstance(cur, Mapping):
            if "name" in v and v["name"] != cur.get("name"):
                dst[k] = copy.deepcopy(dict(v))  # a new plugin replaces the whole node
            else:
                merged = dict(cur)
                merged.update(copy.deepcopy(dict(v)))
                dst[k] = merged
        elif isinstance(v, Mapping) and isinstance(cur, Mapping) and not slot:
            _merge(cur, v, path + ".", where, origin, lines)
        else:
            dst[k] = copy.deepcopy(v)


def _set_path(cfg: dict[str, Any], path: str, value: Any, where: Where) -> None:
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
    slot = _slot_kind(slot_path)
    if last == "name" and slot and not slot[1] and node.get("name") != value:
        node.clear()  # changing the plugin drops the old plugin's options
    node[last] = value


def _mark_new_prefixes(cfg: dict[str, Any], key: str, where: Where) -> None:
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


def _check_framework(cfg: Mapping[str, Any], base: Mapping[str, Any], prefix: str, where: Where) -> None:
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        if _slot_kind(path) or path == "tasks":  # (plugin nodes; tasks: _check_tasks)
            continue
        if prefix == "trainer." and k not in _trainer_own_keys():
            from opdlm.trainer import check_key
            why = check_key(k)
            if why:
                raise where.err(path, why)
            continue  # any other lightning.Trainer argument: Lightning checks its value
        if k not in base:
            new = RENAMED.get(k)
            if new in base:
                raise where.err(path, f"unknown key (renamed: did you mean '{new}'?); valid keys here: {', '.join(base)}")
            raise where.err(path, f"unknown key{did_you_mean(k, base)}; valid keys here: {', '.join(base)}")
        ref = base[k]
        if isinstance(ref, Mapping):
            if not isinstance(v, Mapping):
                raise where.err(path, f"expected a mapping, got {v!r}")
            _check_framework(v, ref, path + ".", where)
        elif v is None:
            continue
        elif ref is None:  # a key whose default is null: its type is declared in NULLABLE
            kind = NULLABLE.get(path)
            if kind is not None and not isinstance(v, kind):
                raise where.err(path, f"expected {_TYPE_WORDS[kind]} or null, got {v!r} ({type(v).__name__})")
        elif isinstance(ref, bool):
            if not isinstance(v, bool):
                raise where.err(path, f"expected boolean, got {v!r} ({type(v).__name__})")
        elif isinstance(ref, int):
            if isinstance(v, bool) or not isinstance(v, int):
                raise where.err(path, f"expected integer, got {v!r} ({type(v).__name__})")
        elif isinstance(ref, float):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise where.err(path, f"expected number, got {v!r} ({type(v).__name__})")
        elif isinstance(ref, str):
            if not isinstance(v, str):
                raise where.err(path, f"expected string, got {v!r} ({type(v).__name__})")
        elif isinstance(ref, list):
            if not isinstance(v, list):
                raise where.err(path, f"expected a list, got {v!r} ({type(v).__name__})")
            kinds = {type(x) for x in ref} - {bool}
            if kinds and kinds <= {int, float}:  # a list of numbers (betas, ...): every item a number
                bad = [x for x in v if isinstance(x, bool) or not isinstance(x, (int, float))]
                if bad:
                    raise where.err(path, f"expected a list of numbers, got {v!r} ({bad[0]!r} is not a number)")


#: framework keys that were renamed: old name -> new name (the error names the new one)
RENAMED: dict[str, str] = {
    "chunk_size": "teacher_head_block",
    "head_chunk": "student_head_block",
}

#: framework keys whose default is null, and the type of any other value they take
NULLABLE: dict[str, type] = {
    "run.stage_cache": str,
    "teacher.path": str, "teacher.tokenizer_path": str,
    "student.path": str, "student.tokenizer_path": str,
}
_TYPE_WORDS = {str: "a string (a folder)"}


def _trainer_own_keys() -> tuple[str, ...]:
    from opdlm.trainer import OWN_KEYS
    return OWN_KEYS


def _check_plugins(cfg: dict[str, Any], where: Where) -> None:
    for path, kind in PLUGIN_SLOTS.items():
        reg = KINDS[kind][0]
        try:
            cfg[path] = reg.validate(cfg[path], path)
        except ConfigError as e:
            raise e.at(where.of(e.key if e.key.startswith(path) else path)) from None
    for path, kind in PLUGIN_LIST_SLOTS.items():
        reg = KINDS[kind][0]
        nodes = cfg[path]
        if not isinstance(nodes, list):
            raise where.err(path, f"expected a list of {kind} nodes, got {nodes!r}")
        out = []
        for i, node in enumerate(nodes):
            try:
                out.append(reg.validate(node, f"{path}.{i}"))
            except ConfigError as e:
                raise e.at(where.of(e.key if e.key.startswith(path) else path)) from None
        cfg[path] = out


#: keys of a `tasks` entry beyond its task plugin's options
TASK_EXTRAS = ("label", "weight", "teacher", "sampler", "teacher_sft")


def _check_tasks(cfg: dict[str, Any], base: Mapping[str, Any], where: Where) -> None:
    """Complete the entries of ``tasks`` (multi-task runs): each task node checked by its plugin,
    its teacher a whole model node (merged onto ``teacher``; a string is a folder), its sampler a
    whole sampler node (merged onto ``sampler`` unless it names another plugin), its label unique."""
    from opdlm.registry import SAMPLERS, TASKS

    entries = cfg["tasks"]
    if not isinstance(entries, list):
        raise where.err("tasks", f"expected a list of task nodes, got {entries!r}")
    set_task = sorted(k for k in where.origin if k == "task" or k.startswith("task."))
    if entries and set_task:
        raise where.err(set_task[0], "a multi-task run (tasks: [...]) does not read task; set each task in tasks")
    labels: dict[str, int] = {}
    out = []
    for i, entry in enumerate(entries):
        key = f"tasks.{i}"
        if not isinstance(entry, Mapping):
            raise where.err(key, f"expected a task node (a mapping with a name), got {entry!r}")
        try:
            node = TASKS.validate({k: v for k, v in entry.items() if k not in TASK_EXTRAS}, key)
        except ConfigError as e:
            raise e.at(where.of(e.key)) from None
        label = entry.get("label", node["name"])
        if not isinstance(label, str) or not label or "/" in label:
            raise where.err(f"{key}.label", f"expected a name (a non-empty string without '/'), got {label!r}")
        if label in labels:
            raise where.err(f"{key}.label", f"two tasks are named {label!r} (tasks.{labels[label]} and {key}); give "
                                            f"each a label of its own")
        labels[label] = i
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise where.err(f"{key}.weight", f"must be a finite number > 0, got {weight!r}")
        teacher = entry.get("teacher")
        if teacher is None:
            raise where.err(f"{key}.teacher", f"task {label!r} has no teacher; every task of a multi-task run needs "
                                              f"its own (a model node, or a model folder's path)")
        if isinstance(teacher, str):
            teacher = {"path": teacher}
        if not isinstance(teacher, Mapping):
            raise where.err(f"{key}.teacher", f"expected a model node or a folder path, got {teacher!r}")
        teacher = {**cfg["teacher"], **teacher}
        _check_framework(teacher, base["teacher"], f"{key}.teacher.", where)
        sampler = entry.get("sampler") or {}
        if not isinstance(sampler, Mapping):
            raise where.err(f"{key}.sampler", f"expected a sampler node, got {sampler!r}")
        if "name" not in sampler or sampler["name"] == cfg["sampler"]["name"]:
            sampler = {**cfg["sampler"], **sampler}
        try:
            sampler = SAMPLERS.validate(dict(sampler), f"{key}.sampler")
        except ConfigError as e:
            raise e.at(where.of(e.key)) from None
        teacher_sft = entry.get("teacher_sft") or {}
        if not isinstance(teacher_sft, Mapping):
            raise where.err(f"{key}.teacher_sft", f"expected a mapping of stages.teacher_sft keys, got {teacher_sft!r}")
        teacher_sft = {**cfg["stages"]["teacher_sft"], **teacher_sft}
        _check_framework(teacher_sft, base["stages"]["teacher_sft"], f"{key}.teacher_sft.", where)
        out.append({**node, "label": label, "weight": weight, "teacher": teacher, "sampler": sampler,
                    "teacher_sft": teacher_sft})
    if entries:
        schedule = cfg["stages"]["opd"]["task_schedule"]
        if schedule not in ("alternate", "mixed"):
            raise where.err("stages.opd.task_schedule", f"must be alternate or mixed, got {schedule!r}")
        if schedule == "alternate":
            for i, e in enumerate(out):
                if float(e["weight"]) != int(e["weight"]):
                    raise where.err(f"tasks.{i}.weight", f"task_schedule alternate gives each task `weight` consecutive "
                                                         f"batches: a whole number, got {e['weight']!r}")
    cfg["tasks"] = out


def check_finite(node: Any, where: Where, prefix: str = "") -> None:
    """Every number anywhere in the config is finite: a NaN or ±inf (YAML's .nan, .inf) is refused
    wherever it is, in framework keys, plugin options, nested nodes (weighted_sum's terms and their
    weights) and trainer arguments alike, with the file:line or command line that set it."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            check_finite(v, where, f"{prefix}{k}.")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_finite(v, where, f"{prefix}{i}.")
    elif nonfinite(node):
        raise where.err(prefix[:-1], f"must be a finite number, got {node!r}")


def compose(confs: list[str | Path], overrides: list[str], where: Where | None = None) -> dict[str, Any]:
    """Compose base.yaml, the given files and key=value overrides into a checked, plain dict with
    every plugin node completed by its constructor defaults and interpolations resolved.
    ``where`` (optional) receives the origin of every key, for later errors (Where.locate)."""
    where = where if where is not None else Where()
    base = load_yaml(BASE_FILE)
    cfg = copy.deepcopy(base)
    for p, layer in expand_layers(confs):
        _merge(cfg, layer, "", where, str(p), _yaml_lines(p))
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"command line: '{ov}': expected key=value (or conf=FILE)")
        key, _, text = ov.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"command line: '{ov}': empty key")
        _mark_new_prefixes(cfg, key, where)
        where.origin[key] = "command line"
        _set_path(cfg, key, parse_value(text), where)
    _check_framework(cfg, base, "", where)
    discover(cfg["plugin_paths"] or [])
    _check_plugins(cfg, where)
    _check_tasks(cfg, base, where)
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config interpolation failed: {str(e).splitlines()[0]}") from None
    assert isinstance(resolved, dict)
    check_finite(resolved, where)
    return resolved


def to_yaml(cfg: Mapping[str, Any]) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(dict(cfg)))


def split_args(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Split command-line words into (conf files, key=value overrides, --flags)."""
    confs, overrides, flags = [], [], []
    for a in argv:
        if a.startswith("--"):
            flags.append(a)
        elif a.startswith("conf="):
            confs.append(a[len("conf="):])
        else:
            overrides.append(a)
    return confs, overrides, flags
