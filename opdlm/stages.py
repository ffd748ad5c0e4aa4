"""The module and the data of each stage, made one way for the pipeline (opdlm.pipeline) and for the
Python API (opdlm.api): a teacher's SFT on its own task, the student's SFT on every task, OPD with
one task per rollout batch. Each stage starts from its own seed (``seed_stage``), and each model
built in memory from its own (``model_seed``), so a stage's result does not depend on what ran
before it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from torch import nn

from opdlm.builder import BuiltRun
from opdlm.data import TaskData, TaskSchedule
from opdlm.fingerprint import STAGES
from opdlm.models import load_or_build
from opdlm.sft import SFTModule


def seed_stage(cfg: dict[str, Any], stage: str) -> None:
    """Seed every generator for ``stage`` (run.seed + 1000 x its index in STAGES)."""
    L.seed_everything(cfg["run"]["seed"] + 1000 * STAGES.index(stage), workers=True, verbose=False)


def model_seed(cfg: dict[str, Any], role: str) -> int:
    """The seed a model built in memory starts from: run.seed for the student, run.seed + 1 for a teacher."""
    return cfg["run"]["seed"] + (1 if role == "teacher" else 0)


def sft_module(cfg: dict[str, Any], built: BuiltRun, role: str, task: str | None = None, init: str | None = None,
               model: nn.Module | None = None) -> SFTModule:
    """The SFT module of the teacher of ``task`` (role teacher) or of the student: ``model``, else the
    model loaded from the folder ``init``, else one built in memory."""
    spec = built.tasks[task].teacher if task is not None else built.student
    if model is None:
        model = load_or_build(spec, init, model_seed(cfg, role))
    return SFTModule(cfg, role, init, built=built, model=model, task=task)


def stage_data(cfg: dict[str, Any], built: BuiltRun, stage: str, task: str | None = None,
               start: Callable[[], int] = lambda: 0) -> TaskData:
    """A stage's batches: a teacher's SFT (``task``) on its own task; the student's SFT on every task's;
    OPD's one task per rollout batch, in stages.opd.task_schedule's order. ``start``: the batch to
    begin with when iteration starts (a resumed stage's ``batches_done``)."""
    seed, tasks = cfg["run"]["seed"], built.tasks
    sets = built.sets("train")
    labels = [task] if task is not None else list(tasks)
    sets = {label: sets[label] for label in labels}
    if stage != "opd":
        own = tasks[task] if task is not None else None
        st = (own.cfg if own is not None else cfg)["stages"][stage]
        spec = own.teacher if own is not None else built.student
        return TaskData(sets, mode="sft", batch_size=st["batch_size"], steps=st["steps"], seed=seed,
                        tokenizer=spec.tokenizer, chat_template=spec.node["chat_template"], start=start)
    st = cfg["stages"]["opd"]
    schedule = TaskSchedule(labels, [tasks[label].weight for label in labels], st["task_schedule"], seed)
    return TaskData(sets, mode="opd", batch_size=st["prompts_per_step"], steps=-(-st["steps"] // st["num_mini_batches"]),
                    seed=seed, start=start, schedule=schedule)
