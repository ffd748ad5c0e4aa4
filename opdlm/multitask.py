"""Several tasks in one run, one teacher each (config ``tasks``), as the paper's multi-task mix of
math and an agentic game: every task gets its own run (its task, its teacher, its sampler and
budgets; the student and the other plugins shared), and

- each teacher is trained on (or loaded for) its own task only;
- the student's cold start learns from every task's reference solutions at once (mixed batches);
- each OPD rollout batch holds one task, chosen by ``stages.opd.task_schedule`` (``alternate``:
  tasks take turns in order, each for ``weight`` consecutive batches; ``mixed``: each batch's task
  is drawn in proportion to ``weight`` from the run's seed, the same on every process), and is
  sampled with that task's sampler and scored by that task's teacher;
- evaluation reports every task apart (``<split>/<label>/<metric>``) and their mean.

Tiny tokenizers are built from the text of all tasks, so one tiny vocabulary serves every model.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from opdlm.build import BuiltRun, build_run, check_batches, task_texts
from opdlm.errors import ConfigError
from opdlm.models import ModelSpec
from opdlm.plugin_api import Episode, Task
from opdlm.registry import TASKS
from opdlm.types import Example

EXTRAS = ("label", "weight", "teacher", "sampler", "teacher_sft")


def task_config(cfg: dict[str, Any], i: int) -> dict[str, Any]:
    """The single-task config of task i: its task node, its teacher, its sampler and its teacher's
    SFT stage in place of the run's, no ``tasks``."""
    entry = cfg["tasks"][i]
    sub = copy.deepcopy({k: v for k, v in cfg.items() if k != "tasks"})
    sub["tasks"] = []
    sub["task"] = {k: v for k, v in entry.items() if k not in EXTRAS}
    sub["teacher"] = copy.deepcopy(entry["teacher"])
    sub["sampler"] = copy.deepcopy(entry["sampler"])
    sub["stages"]["teacher_sft"] = copy.deepcopy(entry["teacher_sft"])
    return sub


def label_of(example: Example) -> str:
    return example.meta["task"]


class MultiTask(Task):
    """The tasks of a multi-task run as one: each example carries its task's label
    (``meta["task"]``); verifying, extracting and playing go to the example's own task."""

    plugin_name, plugin_kind = "tasks", "task"

    def __init__(self, tasks: dict[str, Task]) -> None:
        self.tasks = tasks
        self._splits: dict[str, list[Example]] = {}

    def examples(self, split: str) -> list[Example]:
        if split not in self._splits:
            self._splits[split] = [dataclasses.replace(ex, meta={**ex.meta, "task": label})
                                   for label, t in self.tasks.items() for ex in t.examples(split)]
        return self._splits[split]

    def of(self, example: Example) -> Task:
        return self.tasks[label_of(example)]

    def verify(self, response: str, example: Example) -> bool:
        return self.of(example).verify(response, example)

    def start(self, example: Example) -> Episode:
        return self.of(example).start(example)

    def corpus(self) -> Iterable[str]:
        for t in self.tasks.values():
            yield from t.corpus()


def build_multi(cfg: dict[str, Any]) -> BuiltRun:
    """One run per task with the student shared; the returned run's ``tasks`` holds them."""
    entries = cfg["tasks"]
    tasks = [TASKS.build(task_config(cfg, i)["task"], f"tasks.{i}") for i in range(len(entries))]
    corpus, train = [], []
    for t in tasks:
        c, tr = task_texts(t)
        corpus += c
        train += tr
    student = ModelSpec(cfg["student"], "student", corpus, train_texts=train)
    runs: dict[str, BuiltRun] = {}
    for i, entry in enumerate(entries):
        runs[entry["label"]] = build_run(task_config(cfg, i), texts=(corpus, train), student=student,
                                         key=f"tasks.{i}.", task=tasks[i])
    first = next(iter(runs.values()))
    multi = MultiTask({label: r.task for label, r in runs.items()})
    check_batches({"stages": {"student_sft": cfg["stages"]["student_sft"]}}, len(multi.examples("train")))
    return dataclasses.replace(first, cfg=cfg, task=multi, tasks=runs,
                               dropped={s: sum(r.dropped[s] for r in runs.values()) for s in first.dropped})


class TaskSchedule:
    """Which task rollout batch s holds: ``alternate`` (in order, ``weight`` consecutive batches
    each) or ``mixed`` (drawn in proportion to ``weight`` from ``seed``); the same on every process."""

    def __init__(self, labels: list[str], weights: list[float], kind: str, seed: int) -> None:
        if kind not in ("alternate", "mixed"):
            raise ConfigError(f"stages.opd.task_schedule: must be alternate or mixed, got {kind!r}")
        self.labels, self.weights, self.kind, self.seed = labels, weights, kind, seed
        self.cycle = [lab for lab, w in zip(labels, weights) for _ in range(int(w))] if kind == "alternate" else []
        self._drawn: list[str] = []
        self._rng = random.Random(seed)

    def __call__(self, step: int) -> str:
        if self.kind == "alternate":
            return self.cycle[step % len(self.cycle)]
        while len(self._drawn) <= step:
            self._drawn.append(self._rng.choices(self.labels, weights=self.weights)[0])
        return self._drawn[step]


class MultiTaskBatches:
    """The OPD prompt batches of one rank for steps [start, steps): batch s holds task
    schedule(s)'s prompts, the k-th batch of that task being the k-th of its own stream of
    reshuffles (opdlm.data.global_batch), cut into the processes' slices as single-task batches are."""

    def __init__(self, items: dict[str, list[Example]], schedule: TaskSchedule, *, batch_size: int, steps: int,
                 seed: int, rank: int, world: int, collate: Callable[[list[Any]], Any],
                 start: Callable[[], int] = lambda: 0) -> None:
        for label, xs in items.items():
            if batch_size > len(xs):
                raise ConfigError(f"stages.opd.prompts_per_step: a batch of {batch_size} is larger than task "
                                  f"{label!r}'s {len(xs)} training items")
        self.items, self.schedule, self.batch_size, self.steps = items, schedule, batch_size, steps
        self.seed, self.rank, self.world, self.collate, self.start = seed, rank, world, collate, start

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        from opdlm.data import global_batch

        caches: dict[str, dict] = {label: {} for label in self.items}
        counts = {label: 0 for label in self.items}
        seeds = {label: self.seed + 7919 * (j + 1) for j, label in enumerate(self.items)}  # a stream per task
        for s in range(self.start()):
            counts[self.schedule(s)] += 1
        per = self.batch_size // self.world
        for step in range(self.start(), self.steps):
            label = self.schedule(step)
            xs = self.items[label]
            idx = global_batch(len(xs), self.batch_size, counts[label], seeds[label], caches[label])
            counts[label] += 1
            yield self.collate([xs[i] for i in idx[self.rank * per:(self.rank + 1) * per]])


def merged_metrics(per_task: dict[str, dict[str, float]], split: str) -> dict[str, float]:
    """``<split>/<label>/<metric>`` for every task, and ``<split>/<metric>``: the mean over the tasks
    that report it."""
    out: dict[str, float] = {}
    names: dict[str, list[float]] = {}
    for label, m in per_task.items():
        for k, v in m.items():
            metric = k.split("/", 1)[1]
            out[f"{split}/{label}/{metric}"] = v
            if "/" not in metric:  # (a task's own benchmarks stay under the task)
                names.setdefault(metric, []).append(v)
    out.update({f"{split}/{m}": sum(vs) / len(vs) for m, vs in names.items()})
    return out
