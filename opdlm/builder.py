"""Build everything a run needs before any weights load, and check that it fits together.

A run is a set of tasks (opdlm.config.task_entries: the config's single ``task``, or the entries of
``tasks``) and one student. Each task (a TaskRun) has its own task plugin, teacher, sampler and
plugins: the run's aligner, support, maskers and loss nodes, built once per task and bound to that
task's teacher. Tiny tokenizers are built from the text of every task, so one vocabulary serves all
tiny models. ``--check`` stops here.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opdlm import dist
from opdlm.config import task_entries, task_view
from opdlm.errors import ConfigError
from opdlm.lengths import check_lengths
from opdlm.models import ModelSpec, unknown_tokens
from opdlm.plugin_api import Aligner, Context, Loss, Masker, Sampler, SupportSelector, Task
from opdlm.prepare import ensure_all
from opdlm.reads import check_reads, probe
from opdlm.registry import ALIGNERS, LOSSES, MASKERS, SAMPLERS, SUPPORTS, TASKS, plugin_options
from opdlm.served import check_served
from opdlm.trainer import check_trainer
from opdlm.types import Example


@dataclass
class TaskRun:
    """One task of a run and everything that is its own: the task plugin, its teacher's spec, its
    sampler and the run's plugins bound to them. ``cfg`` is the config as this task sees it
    (opdlm.config.task_view: its task, teacher, sampler and teacher SFT stage in place of the run's);
    ``key`` goes in front of its keys in messages ("" for a ``task:`` config, "tasks.1." for an
    entry of ``tasks``)."""

    label: str
    key: str
    cfg: dict[str, Any]
    weight: float
    task: Task
    teacher: ModelSpec
    sampler: Sampler
    aligner: Aligner
    support: SupportSelector
    maskers: list[Masker]
    loss: Loss
    ctx: Context
    dropped: dict[str, int] = field(default_factory=dict)  # examples left out per split (data.too_long: skip)


@dataclass
class BuiltRun:
    """A run built from its config before any weights load: its tasks by label (one for a ``task:``
    config), the student they share, and the number of processes. ``several``: the config lists its
    tasks (``tasks: [...]``), so folders, logs and tables name each task."""

    cfg: dict[str, Any]
    world: int
    student: ModelSpec
    tasks: dict[str, TaskRun]
    several: bool = False

    @property
    def dropped(self) -> dict[str, int]:
        """Examples left out per split as too long for the models, over every task."""
        out: dict[str, int] = {}
        for t in self.tasks.values():
            for split, n in t.dropped.items():
                out[split] = out.get(split, 0) + n
        return out

    def summaries(self) -> list[str]:
        """"task LABEL: ..." for each task that describes its data (Task.summary: for jsonl, its
        lines, distinct prompts and splits)."""
        return [f"task {label}: {line}" for label, t in self.tasks.items() if (line := t.task.summary())]

    def sets(self, split: str) -> dict[str, list[Example]]:
        """Each task's examples of ``split``, by label (opdlm.data.TaskData's input)."""
        return {label: t.task.examples(split) for label, t in self.tasks.items()}

    def examples(self, split: str) -> list[Example]:
        """Every task's examples of ``split``, task after task (the student's cold start learns them all)."""
        return [ex for xs in self.sets(split).values() for ex in xs]

    # -- one task's parts, for a run of one task (scripts, tests, benchmarks) -------------------------
    @property
    def only(self) -> TaskRun:
        if len(self.tasks) != 1:
            raise AttributeError(f"this run has {len(self.tasks)} tasks ({', '.join(self.tasks)}): use run.tasks[label]")
        return next(iter(self.tasks.values()))

    task = property(lambda self: self.only.task)
    teacher = property(lambda self: self.only.teacher)
    sampler = property(lambda self: self.only.sampler)
    aligner = property(lambda self: self.only.aligner)
    support = property(lambda self: self.only.support)
    maskers = property(lambda self: self.only.maskers)
    loss = property(lambda self: self.only.loss)
    ctx = property(lambda self: self.only.ctx)


def build_run(cfg: Mapping[str, Any]) -> BuiltRun:
    """Construct and cross-check every plugin of a composed config (opdlm.config.compose)."""
    cfg = dict(cfg)
    check_values(cfg)
    ensure_all(cfg.get("prepare") or [])  # the model folders the config makes (once; verified on use)
    world = check_trainer(cfg["trainer"])
    check_world(cfg, world)
    entries = task_entries(cfg)
    views = [task_view(cfg, entry) for _, entry in entries]
    plugins = [TASKS.build(view["task"], key[:-1] or "task") for (key, _), view in zip(entries, views)]
    models = [cfg["student"], *(v["teacher"] for v in views)]
    corpus = [text for t in plugins for text in t.corpus()] if any(not m["path"] for m in models) else None
    train = ([ex.prompt + (ex.solution or "") for t in plugins for ex in t.examples("train")]
             if any(not m["path"] and m["tiny_tokenizer"] == "bpe" for m in models) else None)
    student = ModelSpec(cfg["student"], "student", corpus, train_texts=train)
    tasks = {}
    for (key, entry), view, plugin in zip(entries, views, plugins):
        tasks[entry["label"]] = _located(key, _build_task, view, key, entry, plugin, student, corpus, train, world)
    run = BuiltRun(cfg=cfg, world=world, student=student, tasks=tasks, several=bool(cfg.get("tasks")))
    st = cfg["stages"]["student_sft"]
    if st["steps"] > 0 and st["batch_size"] > len(run.examples("train")):  # its batches mix every task's examples
        whose = "the task's" if len(tasks) == 1 else "the tasks'"
        raise ConfigError(f"stages.student_sft.batch_size: a batch of {st['batch_size']} is larger than {whose} "
                          f"{len(run.examples('train'))} training examples")
    return run


def _located(key: str, make: Any, *args: Any) -> Any:
    """``make(*args)``, with a task's key prefix ("tasks.1.") put in front of the keys its errors name: its
    task, teacher and sampler keys, and its teacher's SFT stage; a run-wide key says which task."""
    try:
        return make(*args)
    except ConfigError as e:
        if not key:
            raise
        if e.key.split(".")[0] in ("task", "teacher", "sampler"):
            raise ConfigError(e.detail, key=f"{key}{e.key}", origin=e.origin) from None
        if e.key.startswith("stages.teacher_sft."):
            raise ConfigError(e.detail, key=f"{key}teacher_sft.{e.key[len('stages.teacher_sft.'):]}",
                              origin=e.origin) from None
        raise ConfigError(f"{e.detail} (in {key[:-1]})", key=e.key, origin=e.origin) from None


def _build_task(cfg: dict[str, Any], key: str, entry: Mapping[str, Any], task: Task, student: ModelSpec,
                corpus: list[str] | None, train: list[str] | None, world: int) -> TaskRun:
    """One task's run (``cfg``: the task's view of the config), its plugins built and bound."""
    node = cfg["teacher"]
    same_tiny = not node["path"] and not node["tokenizer_path"] and all(
        node[k] == cfg["student"][k] for k in ("path", "tokenizer_path", "tiny_tokenizer", "tiny_vocab", "tiny_digits"))
    teacher = ModelSpec(node, "teacher", corpus, shared_tokenizer=student.tokenizer if same_tiny else None,
                        train_texts=train)
    ctx = Context(student_tokenizer=student.tokenizer, teacher_tokenizer=teacher.tokenizer,
                  student_vocab_rows=student.vocab_rows, teacher_vocab_rows=teacher.vocab_rows, task=task)
    sampler = SAMPLERS.build(cfg["sampler"], "sampler")
    aligner = ALIGNERS.build(cfg["aligner"], "aligner")
    support = SUPPORTS.build(cfg["support"], "support")
    maskers = [MASKERS.build(m, f"maskers.{i}") for i, m in enumerate(cfg["maskers"])]
    loss = LOSSES.build(cfg["loss"], "loss")
    _bind(task, ctx, "task")
    check_task(cfg, task, sampler, world)
    for plugin, name in ((sampler, "sampler"), (aligner, "aligner"), (support, "support"),
                         *((m, f"maskers.{i}") for i, m in enumerate(maskers)), (loss, "loss")):
        _bind(plugin, ctx, name)
    check_plugins(cfg, loss, support, aligner)
    if teacher.served:
        check_served(cfg, loss, support, sampler)
    task, dropped = check_lengths(cfg, task, teacher, student)  # last: the other checks name their keys first
    for spec in (teacher, student):
        check_spelling(cfg, task, spec)
    check_batches(cfg, len(task.examples("train")))
    ctx.task = task
    return TaskRun(label=entry["label"], key=key, cfg=cfg, weight=float(entry["weight"]), task=task, teacher=teacher,
                   sampler=sampler, aligner=aligner, support=support, maskers=maskers, loss=loss, ctx=ctx,
                   dropped=dropped)


def _bind(plugin: Any, ctx: Context, key: str) -> None:
    """Call plugin.bind; an error naming one of the plugin's options gets the config key in front."""
    try:
        plugin.bind(ctx)
    except ConfigError as e:
        if e.key.split(".")[0] in plugin_options(type(plugin)):
            raise e.under(key) from None
        if e.key.startswith(key.split(".")[0]):
            raise
        raise ConfigError(str(e), key=key) from None


def check_task(cfg: Mapping[str, Any], task: Task, sampler: Sampler, world: int) -> None:
    """A task's splits and sampler fit the stages that read them."""
    if not task.examples("test"):
        raise ConfigError("task: the test split is empty, but every stage ends with a test evaluation")
    for stage in ("teacher_sft", "student_sft"):
        if cfg["stages"][stage]["steps"] > 0 and any(ex.solution is None for ex in task.examples("train")):
            raise ConfigError(f"task: stages.{stage} trains on reference solutions, but the train split has "
                              f"examples without one (jsonl: set solution_field; or set stages.{stage}.steps=0)")
    if not task.examples("val") and any(st["val_every"] for st in cfg["stages"].values()):
        raise ConfigError("task: the val split is empty; give it examples or set every stages.*.val_every to 0")
    if getattr(task, "interactive", False) and not sampler.multi_turn:
        raise ConfigError(f"sampler: task '{task.plugin_name}' is played turn by turn, but sampler "
                          f"'{sampler.plugin_name}' writes single responses; set sampler.name=multi_turn")
    strategy = str(cfg["trainer"].get("strategy", "auto")).lower()
    for word, why in sampler.refused_strategies.items():
        if word in strategy:
            others = [s for s in ("ddp", "fsdp", "model_parallel") if not any(w in s for w in sampler.refused_strategies)]
            raise ConfigError(f"sampler: '{sampler.plugin_name}' cannot run under trainer.strategy={strategy}: {why}; "
                              f"use strategy {' or '.join(others)} (or sampler.name=top_p)")
    if world > 1 and sampler.single_process:
        raise ConfigError(f"sampler: '{sampler.plugin_name}' runs in single-process runs only, but this run has "
                          f"{world} processes (trainer.devices x trainer.num_nodes); use sampler.name=top_p")


def check_plugins(cfg: Mapping[str, Any], loss: Loss, support: SupportSelector, aligner: Aligner) -> None:
    """The loss, the support and the aligner work together (what the loss reads, vocabularies, prompts)."""
    loss.check_support(support, "support")
    check_reads(loss, support, aligner)
    for key, part in [*((f"loss.terms.{i}", p) for i, p in enumerate(loss.parts())), ("loss", loss)]:
        probe(part, support.size, key)  # a loss that reads a field it does not declare fails here
    if not aligner.shared_vocabulary and not support.cross_vocabulary:
        raise ConfigError(f"support: '{support.plugin_name}' returns ids of one vocabulary, but aligner "
                          f"'{aligner.plugin_name}' joins two; use a support that maps ids (mapped_topk)")
    if not aligner.uses_teacher_prompt and cfg["teacher"]["chat_template"] != cfg["student"]["chat_template"]:
        raise ConfigError(
            f"teacher.chat_template: aligner '{aligner.plugin_name}' shows the teacher the student's prompt "
            f"tokens, so teacher.chat_template ({cfg['teacher']['chat_template']}) must equal "
            f"student.chat_template ({cfg['student']['chat_template']})"
        )


def check_spelling(cfg: Mapping[str, Any], task: Task, spec: ModelSpec) -> None:
    """The model's tokenizer spells the task's prompts and solutions: the share of their tokens that
    are its unknown token must not exceed data.max_unknown (a ConfigError naming the characters it
    does not know); a smaller, non-zero share is said on stderr. Tokenizers without an unknown token
    (byte-level BPE) spell everything, and a tiny model's tokenizer is built from the task's text:
    neither is measured."""
    node = spec.node
    if not (spec.served or spec.path or node["tokenizer_path"]):
        return
    texts = [t for split in ("train", "val", "test") for ex in task.examples(split)
             for t in (ex.prompt, ex.solution or "")]
    found = unknown_tokens(spec.tokenizer, texts)
    if not found or not found[0]:
        return
    n_unk, total, chars = found
    key = f"{spec.key}.tokenizer_path" if node["tokenizer_path"] else f"{spec.key}.path"
    where = f"the tokenizer of '{node['tokenizer_path'] or spec.path}'"
    limit = float(cfg["data"]["max_unknown"])
    share = n_unk / max(total, 1)
    shown = ", ".join(repr(c) for c in chars[:5]) + (f" and {len(chars) - 5} more" if len(chars) > 5 else "")
    what = (f"{where} turns {share * 100:.3g}% of the task's prompt and solution tokens ({n_unk:,} of {total:,}) "
            f"into its unknown token {spec.tokenizer.unk_token!r}" + (f" (it cannot spell {shown})" if chars else ""))
    if share > limit:
        raise ConfigError(f"{key}: {what}; data.max_unknown allows {limit * 100:.3g}%: use a tokenizer that knows "
                          f"these characters, or replace them in the task's text")
    if dist.is_main():
        print(f"[opdlm] {key}: {what}, within data.max_unknown ({limit * 100:.3g}%)", file=sys.stderr)


def check_values(cfg: Mapping[str, Any]) -> None:
    """What the config check (opdlm.config: types, bounds, choices) cannot see key by key: values that
    must agree with each other, folders that must be writable, dtypes and precisions torch has."""
    def need(ok: bool, key: str, rule: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{key}: must be {rule}, got {value!r}")

    for stage, st in cfg["stages"].items():
        need(len(st["betas"]) == 2, f"stages.{stage}.betas", "two numbers in [0, 1)", st["betas"])
    edges = cfg["stages"]["opd"]["gap_buckets"]
    need(all(isinstance(e, int) for e in edges) and edges == sorted(set(edges)), "stages.opd.gap_buckets",
         "increasing integers >= 0", edges)
    ev = cfg["eval"]
    for split in ("val", "test"):
        n = ev["samples"][split]
        need(all(isinstance(k, int) and k <= n for k in ev["pass_k"][split]), f"eval.pass_k.{split}",
             f"integers between 1 and eval.samples.{split} ({n})", ev["pass_k"][split])
        need(not ev["pass_k"][split] or ev["sampled"], f"eval.pass_k.{split}", "empty when eval.sampled is false",
             ev["pass_k"][split])
    need(ev["greedy"] or ev["sampled"], "eval.greedy", "true when eval.sampled is false (nothing to evaluate)", ev["greedy"])
    name = cfg["run"]["name"]
    need(isinstance(name, str) and name.strip() not in ("", ".", "..") and "/" not in name, "run.name",
         "a folder name (not empty, no '/')", name)
    for key in ("out_dir", "stage_cache"):
        check_folder(f"run.{key}", cfg["run"][key])
    for role in ("teacher", "student"):
        dtype = cfg[role]["dtype"]
        need(isinstance(getattr(torch, str(dtype), None), torch.dtype) and getattr(torch, str(dtype)).is_floating_point,
             f"{role}.dtype", "a torch floating dtype (float32, bfloat16, float16, float64)", dtype)
    need(str(cfg["trainer"]["precision"]) not in ("16-mixed", "16"), "trainer.precision",
         "32-true, bf16-mixed or bf16-true (fp16 loss scaling is not supported by the OPD stage's manual "
         "optimisation)", cfg["trainer"]["precision"])


def check_folder(key: str, path: str | None) -> None:
    """A folder opdlm will write to: an existing folder, or one that can be made under an existing,
    writable folder."""
    if path is None:
        return
    p = Path(str(path)).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}: '{path}' is a file, not a folder")
    probe_dir = p
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ConfigError(f"{key}: '{probe_dir}' (on the way to '{path}') is a file, not a folder")
    try:  # the only sure test of writability (permissions, read-only mounts, pseudo file systems)
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in '{probe_dir}' ({e.strerror})"
                          + (f", needed to make '{path}'" if probe_dir != p else "")) from None


def check_world(cfg: Mapping[str, Any], world: int) -> None:
    """Global batch sizes must split evenly over the processes."""
    for stage, st in cfg["stages"].items():
        key = "prompts_per_step" if "prompts_per_step" in st else "batch_size"
        if st[key] % world:
            raise ConfigError(f"stages.{stage}.{key}: {st[key]} is the batch over all processes and must split "
                              f"evenly over the {world} processes of trainer.devices x trainer.num_nodes")


def check_batches(cfg: Mapping[str, Any], n_train: int) -> None:
    """A task's teacher SFT and OPD batches must fit in its train split (a batch never holds an item
    twice); the student's SFT batches draw from every task (build_run checks those)."""
    for stage in ("teacher_sft", "opd"):
        st = cfg["stages"][stage]
        key = "prompts_per_step" if "prompts_per_step" in st else "batch_size"
        if st["steps"] > 0 and st[key] > n_train:
            raise ConfigError(f"stages.{stage}.{key}: a batch of {st[key]} is larger than the task's {n_train} "
                              f"training examples")
