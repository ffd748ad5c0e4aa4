"""Compose a run configuration: conf/base.yaml <- conf=FILE(s) <- key=value overrides (opdlm.layers),
then check it before anything is built.

Every framework key must exist in conf/base.yaml, with a value of its type, within its bounds
(``BOUNDS``) and among its choices (``CHOICES``); every plugin node is checked against its plugin's
constructor (opdlm.registry); every number is finite. A run is a set of tasks: the single ``task``
node (with the run's ``teacher``, ``sampler`` and ``stages.teacher_sft``) or the entries of ``tasks``
(each with its own), completed the same way (``task_entries``). Errors are one-line ConfigErrors
naming the key, the file and line where it was set, and the valid choices.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opdlm.discovery import discover
from opdlm.errors import ConfigError
from opdlm.guard import MODES as NONFINITE_MODES
from opdlm.layers import (
    PLUGIN_LIST_SLOTS,
    PLUGIN_SLOTS,
    Where,
    expand_layers,
    load_yaml,
    mark_new_prefixes,
    merge,
    parse_value,
    set_path,
    slot_kind,
    yaml_lines,
)
from opdlm.ops.aggregate import AGGREGATIONS
from opdlm.optim import OPTIMIZER_IMPLS
from opdlm.paths import CONF_DIR
from opdlm.prepare import check_entries
from opdlm.registry import KINDS, SAMPLERS, TASKS
from opdlm.schema import Range, check_bounds, did_you_mean, nonfinite
from opdlm.trainer import OWN_KEYS, check_key, check_value

BASE_FILE = CONF_DIR / "base.yaml"
DEFAULT_CONF = CONF_DIR / "demo.yaml"

#: bounds of framework numbers, by their path in conf/base.yaml ("*": any stage, or either model);
#: a list's bound holds for each of its items
BOUNDS: dict[str, Range] = {
    "run.checkpoint_every": Range(ge=1),
    "stages.*.steps": Range(ge=0), "stages.*.batch_size": Range(ge=1), "stages.*.lr": Range(gt=0),
    "stages.*.weight_decay": Range(ge=0), "stages.*.betas": Range(ge=0, lt=1), "stages.*.eps": Range(gt=0),
    "stages.*.warmup_steps": Range(ge=0), "stages.*.max_grad_norm": Range(ge=0), "stages.*.val_every": Range(ge=0),
    "stages.*.nonfinite_skips": Range(ge=1),
    "stages.opd.prompts_per_step": Range(ge=1), "stages.opd.num_mini_batches": Range(ge=1),
    "stages.opd.num_micro_batches": Range(ge=1), "stages.opd.loss_norm_length": Range(ge=0, note="0 = sampler.max_new_tokens"),
    "stages.opd.teacher_head_block": Range(ge=0, note="0 = all positions at once"),
    "stages.opd.student_head_block": Range(ge=1), "stages.opd.gap_buckets": Range(ge=0),
    "stages.opd.log_rollouts": Range(ge=0),
    "eval.val_prompts": Range(ge=0), "eval.test_prompts": Range(ge=0), "eval.batch_size": Range(ge=1),
    "eval.samples.*": Range(ge=1), "eval.pass_k.*": Range(ge=1), "trainer.threads": Range(ge=0),
    **{f"*.{k}": Range(ge=1) for k in ("hidden_size", "intermediate_size", "layers", "heads", "max_positions",
                                       "tiny_digits")},
    "teacher.server.top_k": Range(ge=1), "teacher.server.timeout_s": Range(gt=0),
    "teacher.server.max_in_flight": Range(ge=1), "teacher.server.batch_rows": Range(ge=1),
    "teacher.server.retries": Range(ge=0),
    "*.kv_heads": Range(ge=0, note="0 = heads"), "*.tiny_rows": Range(ge=0, note="0 = the tokenizer's ids"),
    "*.tiny_vocab": Range(ge=64),
    "data.max_unknown": Range(ge=0, le=1),
}
#: choices of framework strings, by their path in conf/base.yaml
CHOICES: dict[str, tuple[str, ...]] = {
    "stages.*.schedule": ("constant", "cosine"), "stages.*.nonfinite": NONFINITE_MODES,
    "stages.*.optimizer_impl": OPTIMIZER_IMPLS,
    "stages.opd.loss_aggregation": AGGREGATIONS, "stages.opd.head": ("naive", "lean"),
    "stages.opd.task_schedule": ("alternate", "mixed"), "data.too_long": ("error", "skip"),
    "*.arch": ("qwen2", "llama"), "*.tiny_tokenizer": ("char", "bpe"),
}
#: framework strings that must start with one of these prefixes, by their path in conf/base.yaml
PREFIXES: dict[str, tuple[str, ...]] = {"teacher.server.url": ("http://", "https://")}
#: framework keys that were renamed: old name -> new name (the error names the new one)
RENAMED: dict[str, str] = {
    "chunk_size": "teacher_head_block",
    "head_chunk": "student_head_block",
    "mini_batches": "num_mini_batches",
    "micro_batches": "num_micro_batches",
}
#: framework keys whose default is null, and the type of any other value they take
NULLABLE: dict[str, type] = {
    "run.stage_cache": str,
    "teacher.path": str, "teacher.tokenizer_path": str, "teacher.server.url": str, "teacher.server.model": str,
    "student.path": str, "student.tokenizer_path": str,
}
_TYPE_WORDS = {str: "a string (a folder)"}
MODELS = ("teacher", "student")


def _declared(table: Mapping[str, Any], schema: str) -> Any:
    """The entry of BOUNDS or CHOICES for a base.yaml path ("*" matches one segment)."""
    for pattern, value in table.items():
        if fnmatch.fnmatchcase(schema, pattern) and pattern.count(".") == schema.count("."):
            return value
    return None


def _choice_text(choices: tuple[str, ...]) -> str:
    return " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)


def _check_value(path: str, schema: str, ref: Any, v: Any, where: Where) -> None:
    """One framework value against its default's type (``ref``), its bounds and its choices."""
    if v is None:
        return
    if ref is None:  # a key whose default is null: its type is declared in NULLABLE
        kind = NULLABLE.get(schema)
        if kind is not None and not isinstance(v, kind):
            word = "a string" if schema.startswith("teacher.server.") else _TYPE_WORDS[kind]
            raise where.err(path, f"expected {word} or null, got {v!r} ({type(v).__name__})")
        prefixes = PREFIXES.get(schema)
        if prefixes and not v.startswith(prefixes):
            raise where.err(path, f"must start with {' or '.join(prefixes)}, got {v!r}")
        return
    for tp, word in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "a list")):
        if isinstance(ref, tp):
            ok = isinstance(v, (int, float)) if tp is float else isinstance(v, tp)
            if not ok or (tp is not bool and isinstance(v, bool)):
                raise where.err(path, f"expected {word}, got {v!r} ({type(v).__name__})")
            break
    if isinstance(ref, list) and ref and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in ref):
        bad = [x for x in v if isinstance(x, bool) or not isinstance(x, (int, float))]
        if bad:  # a list of numbers (betas, ...): every item a number
            raise where.err(path, f"expected a list of numbers, got {v!r} ({bad[0]!r} is not a number)")
    rng = _declared(BOUNDS, schema)
    if rng is not None:
        try:
            check_bounds(v, list[Annotated[float, rng]] if isinstance(v, list) else Annotated[float, rng], path)
        except ConfigError as e:
            raise where.locate(e) from None
    choices = _declared(CHOICES, schema)
    if choices is not None and v not in choices:
        raise where.err(path, f"must be {_choice_text(choices)}, got {v!r}")


def _check_framework(cfg: Mapping[str, Any], base: Mapping[str, Any], prefix: str, where: Where,
                     schema: str | None = None) -> None:
    """Framework keys under ``prefix`` against conf/base.yaml's node ``base``; ``schema``: the node's
    own path in base.yaml when it sits elsewhere (a task's teacher: tasks.1.teacher. -> teacher.)."""
    schema = prefix if schema is None else schema
    for k, v in cfg.items():
        path, spath = f"{prefix}{k}", f"{schema}{k}"
        if slot_kind(spath) or spath == "tasks":  # (plugin nodes; tasks: _check_tasks)
            continue
        if schema == "trainer." and k not in OWN_KEYS:
            why = check_key(k) or check_value(k, v)  # (the argument's annotation in lightning.Trainer)
            if why:
                raise where.err(path, why)
            continue
        if k not in base:
            new = RENAMED.get(k)
            if new in base:
                raise where.err(path, f"unknown key (renamed: did you mean '{new}'?); valid keys here: {', '.join(base)}")
            raise where.err(path, f"unknown key{did_you_mean(k, base)}; valid keys here: {', '.join(base)}")
        ref = base[k]
        if isinstance(ref, Mapping):
            if not isinstance(v, Mapping):
                raise where.err(path, f"expected a mapping, got {v!r}")
            _check_framework(v, ref, path + ".", where, spath + ".")
        else:
            _check_value(path, spath, ref, v, where)


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


#: keys of a task entry beyond its task plugin's options
TASK_EXTRAS = ("label", "weight", "teacher", "sampler", "teacher_sft")


def _check_tasks(cfg: dict[str, Any], base: Mapping[str, Any], where: Where) -> None:
    """Complete the entries of ``tasks``: each checked by _check_entry, its label unique, and with
    task_schedule alternate a whole-number weight."""
    entries = cfg["tasks"]
    if not isinstance(entries, list):
        raise where.err("tasks", f"expected a list of task nodes, got {entries!r}")
    set_task = sorted(k for k in where.origin if k == "task" or k.startswith("task."))
    if entries and set_task:
        raise where.err(set_task[0], "a multi-task run (tasks: [...]) does not read task; set each task in tasks")
    out = [_check_entry(cfg, base, entry, f"tasks.{i}", where) for i, entry in enumerate(entries)]
    labels = [e["label"] for e in out]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            raise where.err(f"tasks.{i}.label", f"two tasks are named {label!r} (tasks.{labels.index(label)} and "
                                                f"tasks.{i}); give each a label of its own")
        if cfg["stages"]["opd"]["task_schedule"] == "alternate" and float(out[i]["weight"]) != int(out[i]["weight"]):
            raise where.err(f"tasks.{i}.weight", f"task_schedule alternate gives each task `weight` consecutive "
                                                 f"batches: a whole number, got {out[i]['weight']!r}")
    cfg["tasks"] = out


def _check_entry(cfg: dict[str, Any], base: Mapping[str, Any], entry: Any, key: str, where: Where) -> dict[str, Any]:
    """One entry of ``tasks`` completed: its task node checked by its plugin; its teacher a whole
    model node (merged onto ``teacher``; a string is a folder); its sampler a whole sampler node
    (merged onto ``sampler`` unless it names another plugin); its teacher_sft merged onto
    stages.teacher_sft; weight > 0."""
    if not isinstance(entry, Mapping):
        raise where.err(key, f"expected a task node (a mapping with a name), got {entry!r}")
    try:
        node = TASKS.validate({k: v for k, v in entry.items() if k not in TASK_EXTRAS}, key)
        label = entry.get("label", node["name"])
        if not isinstance(label, str) or not label or "/" in label:
            raise ConfigError(f"expected a name (a non-empty string without '/'), got {label!r}", key=f"{key}.label")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ConfigError(f"must be a finite number > 0, got {weight!r}", key=f"{key}.weight")
        teacher = entry.get("teacher")
        if teacher is None:
            raise ConfigError(f"task {label!r} has no teacher; every task of a multi-task run needs its own (a model "
                              f"node, or a model folder's path)", key=f"{key}.teacher")
        teacher = {"path": teacher} if isinstance(teacher, str) else teacher
        sampler = entry.get("sampler") or {}
        teacher_sft = entry.get("teacher_sft") or {}
        for name, v in (("teacher", teacher), ("sampler", sampler), ("teacher_sft", teacher_sft)):
            if not isinstance(v, Mapping):
                raise ConfigError(f"expected a {'mapping of stages.teacher_sft keys' if name == 'teacher_sft' else name + ' node'}"
                                  f", got {v!r}", key=f"{key}.{name}")
        if "name" not in sampler or sampler["name"] == cfg["sampler"]["name"]:
            sampler = {**cfg["sampler"], **sampler}
        sampler = SAMPLERS.validate(dict(sampler), f"{key}.sampler")
    except ConfigError as e:
        raise where.locate(e) from None
    teacher = {**cfg["teacher"], **teacher}
    if isinstance(entry.get("teacher"), Mapping) and isinstance(entry["teacher"].get("server"), Mapping):
        teacher["server"] = {**cfg["teacher"]["server"], **entry["teacher"]["server"]}  # (its own keys on the run's)
    _check_framework(teacher, base["teacher"], f"{key}.teacher.", where, "teacher.")
    teacher_sft = {**cfg["stages"]["teacher_sft"], **teacher_sft}
    _check_framework(teacher_sft, base["stages"]["teacher_sft"], f"{key}.teacher_sft.", where, "stages.teacher_sft.")
    return {**node, "label": label, "weight": weight, "teacher": teacher, "sampler": sampler, "teacher_sft": teacher_sft}


def task_entries(cfg: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The tasks of a composed config as (key prefix, completed entry): the entries of ``tasks``
    (prefix "tasks.<i>."), or the single ``task`` with the run's own teacher, sampler and teacher
    SFT stage (prefix "")."""
    if cfg.get("tasks"):
        return [(f"tasks.{i}.", dict(e)) for i, e in enumerate(cfg["tasks"])]
    task = cfg["task"]
    return [("", {**task, "label": task["name"], "weight": 1.0, "teacher": cfg["teacher"], "sampler": cfg["sampler"],
                  "teacher_sft": cfg["stages"]["teacher_sft"]})]


def task_view(cfg: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """The config as one task sees it: its task node, teacher, sampler and teacher SFT stage in place
    of the run's, and no ``tasks``. For the single task of a ``task:`` config, equal to the config."""
    view = copy.deepcopy({k: v for k, v in cfg.items() if k != "tasks"})
    view["tasks"] = []
    view["task"] = {k: v for k, v in entry.items() if k not in TASK_EXTRAS}
    view["teacher"] = copy.deepcopy(dict(entry["teacher"]))
    view["sampler"] = copy.deepcopy(dict(entry["sampler"]))
    view["stages"]["teacher_sft"] = copy.deepcopy(dict(entry["teacher_sft"]))
    return view


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


def compose(confs: list[str | Path], overrides: list[str | tuple[str, Any]],
            where: Where | None = None) -> dict[str, Any]:
    """Compose base.yaml, the given files and key=value overrides into a checked, plain dict with
    every plugin node completed by its constructor defaults and interpolations resolved. An
    override is a command-line word "key=value" (the value parsed as YAML), or a (key, value) pair
    whose value is taken as it is (opdlm.api.compose's mapping of overrides).
    ``where`` (optional) receives the origin of every key, for later errors (Where.locate)."""
    where = where if where is not None else Where()
    discover()  # the built-in plugins first: a layer that renames a plugin node resolves its aliases
    base = load_yaml(BASE_FILE)
    cfg = copy.deepcopy(base)
    for p, layer in expand_layers(confs):
        merge(cfg, layer, "", where, str(p), yaml_lines(p))
    for ov in overrides:
        if isinstance(ov, tuple):
            key, value = ov
        else:
            if "=" not in ov:
                raise ConfigError(f"command line: '{ov}': expected key=value (or conf=FILE)")
            key, _, text = ov.partition("=")
            key = key.strip()
            if not key:
                raise ConfigError(f"command line: '{ov}': empty key")
            try:
                value = parse_value(text)
            except ValueError as e:
                raise ConfigError(f"command line: '{ov}': {key}: the value is not valid YAML ({e})") from None
        mark_new_prefixes(cfg, key, where)
        where.origin[key] = "command line"
        set_path(cfg, key, value, where)
    cfg = _resolve(cfg, where)  # ${...} first: the checks see the values they stand for
    _check_framework(cfg, base, "", where)
    _check_plugin_paths(cfg["plugin_paths"], where)
    discover(cfg["plugin_paths"] or [])  # and the config's own plugin folders
    _check_plugins(cfg, where)
    _check_tasks(cfg, base, where)
    resolved = _resolve(cfg, where)  # (plugin defaults are plain values; this keeps the dict plain)
    try:
        resolved["prepare"] = check_entries(resolved["prepare"])
    except ConfigError as e:
        raise where.locate(e) from None
    check_finite(resolved, where)
    return resolved


def _resolve(cfg: dict[str, Any], where: Where) -> dict[str, Any]:
    """``cfg`` with every ${...} interpolation replaced by its value; a ConfigError naming the key
    that holds a broken one (and where it was set), and what is wrong with it."""
    try:
        out = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except OmegaConfBaseException as e:
        key = re.sub(r"\[(\d+)\]", r".\1", str(getattr(e, "full_key", "") or ""))
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        missing = re.match(r"Interpolation key '([^']+)' not found", first)
        why = f"${{{missing.group(1)}}} names no key of the config" if missing else first
        if key:
            raise where.err(key, f"interpolation failed: {why}") from None
        raise ConfigError(f"config interpolation failed: {why}") from None
    assert isinstance(out, dict)
    return out


def _check_plugin_paths(paths: Any, where: Where) -> None:
    """plugin_paths: null or a list of folder paths (strings)."""
    if paths is None:
        return
    if not isinstance(paths, list):
        raise where.err("plugin_paths", f"expected a list of folders, got {paths!r} ({type(paths).__name__})")
    for i, p in enumerate(paths):
        if not isinstance(p, str) or not p:
            raise where.err("plugin_paths", f"item {i}: expected a folder path, got {p!r} ({type(p).__name__})")


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
