"""Build everything a run needs before any weights load: the task, both tokenizers, every plugin,
and the cross-plugin checks (support size vs loss, vocabularies vs aligner). ``--check`` stops here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opdlm.models import ModelSpec
from opdlm.plugin_api import Aligner, Context, Loss, Masker, Sampler, SupportSelector, Task
from opdlm.registry import (
    ALIGNERS,
    LOSSES,
    MASKERS,
    SAMPLERS,
    SUPPORTS,
    TASKS,
    ConfigError,
    plugin_options,
)


@dataclass
class Plan:
    cfg: dict[str, Any]
    task: Task
    teacher: ModelSpec
    student: ModelSpec
    sampler: Sampler
    aligner: Aligner
    support: SupportSelector
    maskers: list[Masker]
    loss: Loss
    ctx: Context


def _bind(plugin: Any, ctx: Context, key: str) -> None:
    """Call plugin.bind; an error naming one of the plugin's options gets the config key in front."""
    try:
        plugin.bind(ctx)
    except ConfigError as e:
        msg = str(e)
        head = msg.split(":", 1)[0]
        if head in plugin_options(type(plugin)):
            raise ConfigError(f"{key}.{msg}") from None
        if head.startswith(key.split(".")[0]):
            raise
        raise ConfigError(f"{key}: {msg}") from None


def build_plan(cfg: Mapping[str, Any]) -> Plan:
    """Construct and cross-check every plugin of a composed config (see opdlm.config.compose)."""
    cfg = dict(cfg)
    task = TASKS.build(cfg["task"], "task")
    corpus = None
    if not cfg["teacher"]["path"] or not cfg["student"]["path"]:
        corpus = list(task.corpus())
    teacher = ModelSpec(cfg["teacher"], "teacher", corpus)
    shared = teacher.tokenizer if not cfg["teacher"]["path"] and not cfg["teacher"]["tokenizer_path"] else None
    student = ModelSpec(cfg["student"], "student", corpus, shared_tokenizer=shared)
    ctx = Context(student_tokenizer=student.tokenizer, teacher_tokenizer=teacher.tokenizer,
                  student_vocab_rows=student.vocab_rows, teacher_vocab_rows=teacher.vocab_rows, task=task)
    sampler = SAMPLERS.build(cfg["sampler"], "sampler")
    aligner = ALIGNERS.build(cfg["aligner"], "aligner")
    support = SUPPORTS.build(cfg["support"], "support")
    maskers = [MASKERS.build(node, f"maskers.{i}") for i, node in enumerate(cfg["maskers"])]
    loss = LOSSES.build(cfg["loss"], "loss")
    _bind(task, ctx, "task")
    _bind(sampler, ctx, "sampler")
    _bind(aligner, ctx, "aligner")
    _bind(support, ctx, "support")
    for i, m in enumerate(maskers):
        _bind(m, ctx, f"maskers.{i}")
    _bind(loss, ctx, "loss")
    loss.check_support(support, "support")
    return Plan(cfg=cfg, task=task, teacher=teacher, student=student, sampler=sampler,
                aligner=aligner, support=support, maskers=maskers, loss=loss, ctx=ctx)
