"""Build everything a run needs before any weights load: the task, both tokenizers, every plugin,
and the cross-plugin checks (support size vs loss, vocabularies vs aligner). ``--check`` stops here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opdlm.errors import ConfigError
from opdlm.guard import MODES as NONFINITE_MODES
from opdlm.lengths import check_lengths
from opdlm.models import ModelSpec
from opdlm.ops.aggregate import AGGREGATIONS
from opdlm.plugin_api import Aligner, Context, Loss, Masker, Sampler, SupportSelector, Task
from opdlm.reads import check_reads, probe
from opdlm.registry import ALIGNERS, LOSSES, MASKERS, SAMPLERS, SUPPORTS, TASKS, plugin_options
from opdlm.trainer import check_trainer


@dataclass
class BuiltRun:
    """Everything a run is made of, built and cross-checked from its config before any weights
    load: the task, both models' specs (tokenizers, configs), every plugin and their Context."""

    cfg: dict[str, Any]
    world: int  # processes of the run (devices x nodes)
    dropped: dict[str, int]  # examples left out per split as too long for the models (data.too_long: skip)
    task: Task
    teacher: ModelSpec
    student: ModelSpec
    sampler: Sampler
    aligner: Aligner
    support: SupportSelector
    maskers: list[Masker]
    loss: Loss
    ctx: Context
    #: multi-task runs (config ``tasks``): each task's own run (its task, teacher, sampler; the student
    #: shared), by label; ``task`` is then an opdlm.multitask.MultiTask over them and the plugins
    #: above are the first task's
    tasks: dict[str, BuiltRun] | None = None


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


def check_values(cfg: Mapping[str, Any]) -> None:
    """Range checks of framework keys (types were checked when composing)."""
    def need(ok: bool, key: str, rule: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{key}: must be {rule}, got {value!r}")

    for stage, st in cfg["stages"].items():
        k = f"stages.{stage}"
        need(st["steps"] >= 0, f"{k}.steps", ">= 0", st["steps"])
        need(st["lr"] > 0, f"{k}.lr", "> 0", st["lr"])
        need(st["weight_decay"] >= 0, f"{k}.weight_decay", ">= 0", st["weight_decay"])
        betas = st["betas"]
        need(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"{k}.betas", "two numbers in [0, 1)", betas)
        need(st["eps"] > 0, f"{k}.eps", "> 0", st["eps"])
        if "gap_buckets" in st:
            edges = st["gap_buckets"]
            need(all(isinstance(e, int) and e >= 0 for e in edges) and edges == sorted(set(edges)),
                 f"{k}.gap_buckets", "increasing integers >= 0", edges)
            need(st["log_rollouts"] >= 0, f"{k}.log_rollouts", ">= 0", st["log_rollouts"])
        if "loss_aggregation" in st:
            need(st["loss_aggregation"] in AGGREGATIONS, f"{k}.loss_aggregation", " | ".join(AGGREGATIONS),
                 st["loss_aggregation"])
            need(st["loss_norm_length"] >= 0, f"{k}.loss_norm_length", ">= 0 (0 = sampler.max_new_tokens)",
                 st["loss_norm_length"])
        need(st["warmup_steps"] >= 0, f"{k}.warmup_steps", ">= 0", st["warmup_steps"])
        need(st["schedule"] in ("constant", "cosine"), f"{k}.schedule", "constant or cosine", st["schedule"])
        need(st["val_every"] >= 0, f"{k}.val_every", ">= 0", st["val_every"])
        need(st["max_grad_norm"] is None or st["max_grad_norm"] >= 0, f"{k}.max_grad_norm", ">= 0 or null", st["max_grad_norm"])
        need(st["nonfinite"] in NONFINITE_MODES, f"{k}.nonfinite", " or ".join(NONFINITE_MODES), st["nonfinite"])
        need(st["nonfinite_skips"] >= 1, f"{k}.nonfinite_skips", ">= 1", st["nonfinite_skips"])
        for key in ("batch_size", "prompts_per_step", "mini_batches", "micro_batches"):
            if key in st:
                need(st[key] >= 1, f"{k}.{key}", ">= 1", st[key])
        if "teacher_head_block" in st:
            need(st["teacher_head_block"] >= 0, f"{k}.teacher_head_block", ">= 0 (0 = all positions at once)",
                 st["teacher_head_block"])
        if "head" in st:
            need(st["head"] in ("naive", "lean"), f"{k}.head", "naive or lean", st["head"])
            need(st["student_head_block"] >= 1, f"{k}.student_head_block", ">= 1", st["student_head_block"])
    ev = cfg["eval"]
    need(ev["batch_size"] >= 1, "eval.batch_size", ">= 1", ev["batch_size"])
    need(ev["val_prompts"] >= 0, "eval.val_prompts", ">= 0", ev["val_prompts"])
    need(ev["test_prompts"] >= 0, "eval.test_prompts", ">= 0", ev["test_prompts"])
    for split in ("val", "test"):
        n = ev["samples"][split]
        need(isinstance(n, int) and n >= 1, f"eval.samples.{split}", "an integer >= 1", n)
        for k in ev["pass_k"][split]:
            need(isinstance(k, int) and 1 <= k <= n, f"eval.pass_k.{split}",
                 f"integers between 1 and eval.samples.{split} ({n})", ev["pass_k"][split])
        need(not ev["pass_k"][split] or ev["sampled"], f"eval.pass_k.{split}", "empty when eval.sampled is false",
             ev["pass_k"][split])
    need(ev["greedy"] or ev["sampled"], "eval.greedy", "true when eval.sampled is false (nothing to evaluate)", ev["greedy"])
    need(cfg["trainer"]["threads"] >= 0, "trainer.threads", ">= 0", cfg["trainer"]["threads"])
    need(cfg["data"]["too_long"] in ("error", "skip"), "data.too_long", "error or skip", cfg["data"]["too_long"])
    need(cfg["run"]["checkpoint_every"] >= 1, "run.checkpoint_every", ">= 1", cfg["run"]["checkpoint_every"])
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
    for role in ("teacher", "student"):
        node = cfg[role]
        if not node["path"]:
            for key in ("hidden_size", "intermediate_size", "layers", "heads", "max_positions"):
                need(node[key] >= 1, f"{role}.{key}", ">= 1", node[key])
            need(node["kv_heads"] >= 0, f"{role}.kv_heads", ">= 0 (0 = heads)", node["kv_heads"])
            need(node["tiny_rows"] >= 0, f"{role}.tiny_rows", ">= 0 (0 = the tokenizer's ids)", node["tiny_rows"])


def check_folder(key: str, path: str | None) -> None:
    """A folder opdlm will write to: an existing folder, or one that can be made under an existing,
    writable folder."""
    if path is None:
        return
    p = Path(str(path)).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}: '{path}' is a file, not a folder")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}: '{probe}' (on the way to '{path}') is a file, not a folder")
    import tempfile
    try:  # the only sure test of writability (permissions, read-only mounts, pseudo file systems)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in '{probe}' ({e.strerror})"
                          + (f", needed to make '{path}'" if probe != p else "")) from None


def check_world(cfg: Mapping[str, Any], world: int) -> None:
    """Global batch sizes must split evenly over the processes."""
    for stage, st in cfg["stages"].items():
        key = "prompts_per_step" if "prompts_per_step" in st else "batch_size"
        if st[key] % world:
            raise ConfigError(f"stages.{stage}.{key}: {st[key]} is the batch over all processes and must split "
                              f"evenly over the {world} processes of trainer.devices x trainer.num_nodes")


def task_texts(task: Task) -> tuple[list[str], list[str]]:
    """What tiny tokenizers are built from: the task's character inventory (Task.corpus) and the
    training texts BPE merges are learnt on."""
    return list(task.corpus()), [ex.prompt + (ex.solution or "") for ex in task.examples("train")]


def build_run(cfg: Mapping[str, Any], *, texts: tuple[list[str], list[str]] | None = None,
              student: ModelSpec | None = None, key: str = "", task: Task | None = None) -> BuiltRun:
    """Construct and cross-check every plugin of a composed config (see opdlm.config.compose).
    A multi-task config (``tasks``) builds one run per task (opdlm.multitask); each of those is
    built here with the tiny tokenizers' ``texts`` of all tasks, the shared ``student`` spec, and
    ``key`` (e.g. 'tasks.1.') in front of its task's keys in errors, and its ``task`` built already."""
    cfg = dict(cfg)
    if cfg.get("tasks"):
        from opdlm.multitask import build_multi
        return build_multi(cfg)
    try:
        return _build_one(cfg, texts, student, task)
    except ConfigError as e:
        if key and e.key.split(".")[0] in ("task", "teacher", "sampler"):
            raise ConfigError(e.detail, key=f"{key}{e.key}", origin=e.origin) from None
        if key and e.key.startswith("stages.teacher_sft."):  # the task's own teacher_sft
            raise ConfigError(e.detail, key=f"{key}teacher_sft.{e.key[len('stages.teacher_sft.'):]}",
                              origin=e.origin) from None
        if key:  # a run-wide key, about this task
            raise ConfigError(f"{e.detail} (in {key[:-1]})", key=e.key, origin=e.origin) from None
        raise


def check_batches(cfg: Mapping[str, Any], n_train: int, shared_student: bool = False) -> None:
    """A training stage's batch must fit in the train split (a batch never holds an item twice).
    ``shared_student``: one task of several, whose student SFT batches draw from every task."""
    for stage, st in cfg["stages"].items():
        key = "prompts_per_step" if "prompts_per_step" in st else "batch_size"
        if st["steps"] > 0 and st[key] > n_train and not (shared_student and stage == "student_sft"):
            raise ConfigError(f"stages.{stage}.{key}: a batch of {st[key]} is larger than the task's {n_train} "
                              f"training examples")


def _build_one(cfg: dict[str, Any], texts: tuple[list[str], list[str]] | None, student: ModelSpec | None,
               task: Task | None) -> BuiltRun:
    student_given = student is not None
    check_values(cfg)
    world = check_trainer(cfg["trainer"])
    check_world(cfg, world)
    if task is None:
        task = TASKS.build(cfg["task"], "task")
    corpus, train_texts = None, None
    if texts is not None:
        corpus, train_texts = texts
    else:
        if not cfg["teacher"]["path"] or not cfg["student"]["path"]:
            corpus = list(task.corpus())
        if any(not cfg[r]["path"] and cfg[r]["tiny_tokenizer"] == "bpe" for r in ("teacher", "student")):
            train_texts = task_texts(task)[1]
    teacher = ModelSpec(cfg["teacher"], "teacher", corpus, train_texts=train_texts)
    tiny_keys = ("path", "tokenizer_path", "tiny_tokenizer", "tiny_vocab", "tiny_digits")
    same_tiny = all(cfg["teacher"][k] == cfg["student"][k] for k in tiny_keys)
    shared = teacher.tokenizer if not cfg["teacher"]["path"] and not cfg["teacher"]["tokenizer_path"] and same_tiny else None
    if student is None:
        student = ModelSpec(cfg["student"], "student", corpus, shared_tokenizer=shared, train_texts=train_texts)
    ctx = Context(student_tokenizer=student.tokenizer, teacher_tokenizer=teacher.tokenizer,
                  student_vocab_rows=student.vocab_rows, teacher_vocab_rows=teacher.vocab_rows, task=task)
    sampler = SAMPLERS.build(cfg["sampler"], "sampler")
    aligner = ALIGNERS.build(cfg["aligner"], "aligner")
    support = SUPPORTS.build(cfg["support"], "support")
    maskers = [MASKERS.build(node, f"maskers.{i}") for i, node in enumerate(cfg["maskers"])]
    loss = LOSSES.build(cfg["loss"], "loss")
    _bind(task, ctx, "task")
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
    if world > 1 and sampler.single_process:
        raise ConfigError(f"sampler: '{sampler.plugin_name}' runs in single-process runs for now, but this run has "
                          f"{world} processes (trainer.devices x trainer.num_nodes); use sampler.name=top_p")
    _bind(sampler, ctx, "sampler")
    _bind(aligner, ctx, "aligner")
    _bind(support, ctx, "support")
    for i, m in enumerate(maskers):
        _bind(m, ctx, f"maskers.{i}")
    _bind(loss, ctx, "loss")
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
    task, dropped = check_lengths(cfg, task, teacher, student)  # last: the other checks name their keys first
    check_batches(cfg, len(task.examples("train")), shared_student=student_given)
    ctx.task = task
    return BuiltRun(cfg=cfg, world=world, dropped=dropped, task=task, teacher=teacher, student=student, sampler=sampler,
                aligner=aligner, support=support, maskers=maskers, loss=loss, ctx=ctx)
