"""What a stage's cached result depends on, as one hash (the evaluation keys apart, in
``eval_fingerprint``): the config parts the stage reads (earlier
stages included), the tokenizers' vocabularies, and the code: the source of the opdlm package and
of every plugin file the stage uses (the classes of its plugins and of the plugins nested in them).
Editing a loss recomputes the OPD stage; it does not recompute the SFT stages, which use only the
task and the sampler. The OPD stage also depends on the number of processes (each rank samples
with its own random stream); the SFT stages do not (the same global batches and the same token
mean on any number of processes, up to the order of float sums)."""

from __future__ import annotations

import hashlib
import inspect
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from opdlm.optim import OPTIMIZER_KEYS

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


def plugin_files(objects: list[Any]) -> list[str]:
    """Source files of the plugin classes in ``objects`` and of the plugins they hold (attributes,
    lists, tuples and dicts are searched), sorted."""
    from opdlm.plugin_api import Plugin

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
                try:
                    files.add(str(Path(inspect.getsourcefile(cls) or "").resolve()))
                except TypeError:
                    pass
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


def code_digest(stage: str, built: Any) -> str:
    """Hash of the opdlm package and of the plugin files ``stage`` uses."""
    used = [built.task, built.sampler, *(r.sampler for r in (built.tasks or {}).values())]
    if stage == "opd":
        used += [built.aligner, built.support, *built.maskers, built.loss]
    h = hashlib.sha256(package_digest().encode())
    for f in plugin_files(used):
        h.update(f.encode() + b"\0" + Path(f).read_bytes() + b"\0")
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


def fingerprint(cfg: dict[str, Any], stage: str, built: Any, code: bool = True, frame: bool = False) -> str:
    """Hash of everything a stage's result depends on (see the module docstring); ``code=False``
    leaves the code out (what a run folder's result was made with, as configuration); ``frame=True``
    leaves the stage's optimizer keys out (what a stage stopped by a non-finite step may continue
    under: opdlm.guard)."""
    stages = {k: _hashed(v) for k, v in cfg["stages"].items()}
    if frame:
        stages[stage] = {k: v for k, v in stages[stage].items() if k not in OPTIMIZER_KEYS}
    parts: dict[str, Any] = {"seed": cfg["run"]["seed"], "task": cfg["task"],
                             **({"tasks": [_hashed(e) for e in cfg["tasks"]]} if cfg.get("tasks") else {}),
                             "data": cfg["data"], "teacher": cfg["teacher"],
                             "teacher_vocab": vocab_digest(built.teacher.tokenizer),
                             "teacher_sft": stages["teacher_sft"],
                             "precision": cfg["trainer"]["precision"], "code": code_digest(stage, built) if code else ""}
    if stage in ("student_sft", "opd"):
        parts.update(student=cfg["student"], student_sft=stages["student_sft"],
                     student_vocab=vocab_digest(built.student.tokenizer))
    if stage == "opd":
        parts.update({k: cfg[k] for k in ("sampler", "aligner", "support", "maskers", "loss")})
        parts["opd"] = stages["opd"]
        parts["processes"] = built.world  # each process samples with its own random stream
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def eval_fingerprint(cfg: dict[str, Any], stage: str, built: Any, code: bool = True) -> str:
    """Hash of what a stage's test metrics depend on beyond its weights: the evaluation keys and the
    sampler (the sampled mode decodes with it), on top of the training fingerprint."""
    parts = {"train": fingerprint(cfg, stage, built, code), "eval": cfg["eval"], "sampler": cfg["sampler"]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
