"""What a stage's cached result depends on, as one hash (the evaluation keys apart, in
``eval_fingerprint``): the config parts the stage reads (earlier
stages included), the tokenizers' vocabularies, and the code: the source of the opdlm package and
of every plugin file the stage uses (the classes of its plugins and of the plugins nested in them;
a plugin class defined without a file, in a notebook cell, by its code).
Editing a loss recomputes the OPD stage; it does not recompute the SFT stages, which use only the
task and the sampler. The OPD stage also depends on the number of processes (each rank samples
with its own random stream); the SFT stages do not (the same global batches and the same token
mean on any number of processes, up to the order of float sums)."""

from __future__ import annotations

import hashlib
import inspect
import json
import types
from functools import lru_cache
from pathlib import Path
from typing import Any

from opdlm.config import TASK_EXTRAS, task_entries
from opdlm.optim import OPTIMIZER_KEYS
from opdlm.plugin_api import Plugin

PACKAGE_DIR = Path(__file__).resolve().parent
STAGES = ("teacher_sft", "student_sft", "opd")


@lru_cache(maxsize=1)
def package_digest() -> str:
    """sha256 of the opdlm package's Python sources (benchmarks excluded)."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR)
        if rel.parts[0] == "bench" or "__pycache__" in rel.parts:
            continue
        h.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def source_file(cls: type) -> str | None:
    """The resolved path of the file that defines ``cls``, or None when there is none to read (a class
    defined in a notebook cell, in ``python -c`` or on standard input)."""
    try:
        name = inspect.getsourcefile(cls)
    except (TypeError, OSError):  # (a module without __file__: a notebook's __main__, python -c)
        return None
    path = Path(name).resolve() if name else None
    if path is None or not path.is_file():
        return None
    compiled = {Path(f.__code__.co_filename).resolve() for f in _functions(cls)}
    if path not in compiled and any(not c.is_file() for c in compiled):  # code compiled from no file (exec'd in
        return None  # a module that has one, as a notebook cell run by a script): its module's file is not its source
    return str(path)


def _functions(cls: type) -> list[Any]:
    """The functions a class defines itself (methods, static and class methods, property accessors)."""
    out = []
    for value in vars(cls).values():
        parts = [value.fget, value.fset, value.fdel] if isinstance(value, property) else [
            value.__func__ if isinstance(value, (staticmethod, classmethod)) else value]
        out += [f for f in parts if hasattr(f, "__code__")]
    return out


def class_digest(cls: type) -> str:
    """Hash of the code of a plugin class that has no source file (``source_file`` is None): the
    byte code, constants and names of each of its functions and the repr of its other attributes, in
    the order the class defines them. Redefining the class with other code (a notebook cell run
    again, edited) changes it, so a stage of a run that uses it is computed anew."""
    h = hashlib.sha256(f"{cls.__module__}.{cls.__qualname__}".encode())
    for name, value in vars(cls).items():
        if name in ("__dict__", "__weakref__"):
            continue
        if isinstance(value, property):
            parts = [value.fget, value.fset, value.fdel]
        else:
            parts = [value.__func__ if isinstance(value, (staticmethod, classmethod)) else value]
        h.update(name.encode() + b"\0")
        for part in parts:
            code = getattr(part, "__code__", None)
            h.update(_code_bytes(code) if code is not None else repr(part).encode())
            h.update(b"\0")
    return h.hexdigest()[:16]


def _code_bytes(code: types.CodeType) -> bytes:
    """A code object's byte code, names and constants (nested functions included), without its file
    name and line numbers."""
    consts = [_code_bytes(c) if isinstance(c, types.CodeType) else repr(c).encode() for c in code.co_consts]
    return b"\1".join([code.co_code, repr(code.co_names).encode(), repr(code.co_varnames).encode(), *consts])


def plugin_files(objects: list[Any], fileless: dict[str, type] | None = None) -> list[str]:
    """Source files of the plugin classes in ``objects`` and of the plugins they hold (attributes,
    lists, tuples and dicts are searched), sorted. Classes without a source file (``source_file``)
    go into ``fileless`` (by module and name), when given."""

    seen: set[int] = set()
    files: set[str] = set()

    def walk(x: Any, depth: int) -> None:
        if depth > 6 or id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, Plugin):
            for cls in type(x).__mro__:
                if cls is Plugin or not issubclass(cls, Plugin) or cls.__module__.startswith("opdlm."):
                    continue
                path = source_file(cls)
                if path is not None:
                    files.add(path)
                elif fileless is not None:
                    fileless[f"{cls.__module__}.{cls.__qualname__}"] = cls
            for v in vars(x).values():
                walk(v, depth + 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v, depth + 1)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, depth + 1)

    for o in objects:
        walk(o, 0)
    return sorted(f for f in files if f)


def _scope(stage: str, built: Any, task: str | None) -> list[Any]:
    """The tasks a stage depends on: a teacher stage its own task (``task``, or the run's only one),
    the student's stages every task."""
    if stage == "teacher_sft":
        return [built.tasks[task] if task is not None else built.only]
    return list(built.tasks.values())


def code_digest(stage: str, built: Any, task: str | None = None) -> str:
    """Hash of the opdlm package and of the plugin files ``stage`` uses (of its task, or of every task)."""
    used: list[Any] = []
    for t in _scope(stage, built, task):
        used += [t.task, t.sampler]
        if stage == "opd":
            used += [t.aligner, t.support, *t.maskers, t.loss]
    h = hashlib.sha256(package_digest().encode())
    fileless: dict[str, type] = {}
    for f in plugin_files(used, fileless):
        h.update(f.encode() + b"\0" + Path(f).read_bytes() + b"\0")
    for name, cls in sorted(fileless.items()):  # (a plugin defined in a notebook cell: its code itself)
        h.update(name.encode() + b"\0" + class_digest(cls).encode() + b"\0")
    return h.hexdigest()[:16]


def vocab_digest(tokenizer: Any) -> str:
    blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: stage keys a stage's result does not depend on: what happens to a step whose loss or gradient is not
#: finite (opdlm.guard). A run stopped by one continues from its checkpoint with nonfinite=skip; a
#: stage folder records how many steps it skipped.
UNHASHED_STAGE_KEYS = ("nonfinite", "nonfinite_skips")


def _hashed(node: Any) -> Any:
    """A stage node (or a multi-task entry holding one) without the keys its result does not depend on."""
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if k not in UNHASHED_STAGE_KEYS}
    if isinstance(out.get("teacher_sft"), dict):
        out["teacher_sft"] = _hashed(out["teacher_sft"])
    return out


def _model_node(node: dict[str, Any]) -> dict[str, Any]:
    """A model node without its server's transport keys (how requests travel, not what they return;
    what a served teacher's weights are opdlm cannot see: its url and model name stand for them)."""
    if "server" not in node:
        return node
    return {**node, "server": {k: node["server"][k] for k in ("url", "model", "top_k")}}


def _prepared(entries: list[dict[str, Any]], paths: list[Any]) -> list[dict[str, Any]]:
    """The entries of the config's ``prepare`` list whose folders the paths name, with the entries
    those were cut from (in list order)."""
    want = {str(Path(p)) for p in paths if p}
    for e in reversed(entries):  # a later entry may cut an earlier one's folder
        if str(Path(e["out"])) in want and e.get("from"):
            want.add(str(Path(e["from"])))
    return [e for e in entries if str(Path(e["out"])) in want]


def fingerprint(cfg: dict[str, Any], stage: str, built: Any, code: bool = True, frame: bool = False,
                task: str | None = None) -> str:
    """Hash of everything a stage's result depends on (see the module docstring); ``task``: the task
    of a teacher stage (default: the run's only one); ``code=False`` leaves the code out (what a run
    folder's result was made with, as configuration); ``frame=True`` leaves the stage's optimizer keys
    out (what a stage stopped by a non-finite step may continue under: opdlm.guard)."""
    def stage_node(node: dict[str, Any], name: str) -> Any:
        node = _hashed(node)
        return {k: v for k, v in node.items() if k not in OPTIMIZER_KEYS} if frame and name == stage else node

    entries = {e["label"]: e for _, e in task_entries(cfg)}  # the config's values; the built run's vocabularies
    tasks = [{"label": t.label, "weight": entries[t.label]["weight"],
              "task": {k: v for k, v in entries[t.label].items() if k not in TASK_EXTRAS},
              "teacher": _model_node(entries[t.label]["teacher"]), "teacher_vocab": vocab_digest(t.teacher.tokenizer),
              "teacher_sft": stage_node(entries[t.label]["teacher_sft"], "teacher_sft"),
              **({"sampler": entries[t.label]["sampler"]} if stage == "opd" else {})} for t in _scope(stage, built, task)]
    parts: dict[str, Any] = {"seed": cfg["run"]["seed"], "tasks": tasks, "data": cfg["data"],
                             "precision": cfg["trainer"]["precision"],
                             "code": code_digest(stage, built, task) if code else ""}
    paths = [t["teacher"]["path"] for t in tasks] + ([cfg["student"]["path"]] if stage != "teacher_sft" else [])
    made = _prepared(cfg.get("prepare") or [], paths)
    if made:  # (the prepare entries that made the stage's model folders, and the ones they were cut from)
        parts["prepare"] = made
    if stage in ("student_sft", "opd"):
        parts.update(student=cfg["student"], student_sft=stage_node(cfg["stages"]["student_sft"], "student_sft"),
                     student_vocab=vocab_digest(built.student.tokenizer))
    if stage == "opd":
        parts.update({k: cfg[k] for k in ("aligner", "support", "maskers", "loss")})
        parts["opd"] = stage_node(cfg["stages"]["opd"], "opd")
        parts["processes"] = built.world  # each process samples with its own random stream
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def eval_fingerprint(cfg: dict[str, Any], stage: str, built: Any, code: bool = True, task: str | None = None) -> str:
    """Hash of what a stage's test metrics depend on beyond its weights: the evaluation keys and the
    samplers (the sampled mode decodes with them), on top of the training fingerprint."""
    entries = {e["label"]: e for _, e in task_entries(cfg)}
    parts = {"train": fingerprint(cfg, stage, built, code, task=task), "eval": cfg["eval"],
             "samplers": [entries[t.label]["sampler"] for t in _scope(stage, built, task)]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
