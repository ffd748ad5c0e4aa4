"""Run the stages of an experiment in its run folder ``runs/<name>/``:

teacher SFT -> student SFT (cold start) -> on-policy distillation -> test evaluation of the
teacher, the student before OPD and the student after OPD. Each finished stage leaves a Hugging
Face folder and a ``stage.json`` (fingerprint of config and code, test metrics); a re-run with the
same fingerprint skips it and says so.

Nothing is trusted that a kill could have left half-written: a stage folder is written under a
temporary name and renamed into place once complete, and an interrupted stage resumes from its last
Lightning checkpoint (``checkpoints/<stage>/last.ckpt``) when that checkpoint carries the stage's
fingerprint; any other checkpoint is reported and set aside.

On several processes (see opdlm.dist) every rank runs this pipeline in lockstep: rank 0 decides
from the cache and broadcasts the decision, writes every file and prints; the others wait at the
barriers and read what it wrote. Test evaluation is sharded over the ranks and summed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from opdlm import dist
from opdlm.build import BuiltRun, build_run
from opdlm.cache import FolderBusy, Lock, file_digests, lookup, remove_stale, replace_folder, write_json
from opdlm.config import to_yaml
from opdlm.data import TaskData
from opdlm.evaluation import evaluate
from opdlm.fingerprint import STAGES, eval_fingerprint, fingerprint
from opdlm.guard import STOPPED, NonFiniteError, first_nonfinite
from opdlm.models import load_or_build, load_weights, n_params, save_hf
from opdlm.module import OPDModule
from opdlm.optim import OPTIMIZER_KEYS
from opdlm.results import config_diff, results_table
from opdlm.sft import SFTModule
from opdlm.trainer import checkpoint_dir, make_trainer, quiet_libraries

__all__ = ["FolderBusy", "RunInterrupted", "Runner"]


def _data(built: BuiltRun, cfg: dict[str, Any], stage: str, spec: Any, start: Callable[[], int]) -> TaskData:
    st = cfg["stages"][stage]
    steps = -(-st["steps"] // st["mini_batches"]) if stage == "opd" else st["steps"]  # rollout batches
    schedule = None
    if stage == "opd" and built.tasks:  # one task per rollout batch, in the schedule's order
        from opdlm.multitask import TaskSchedule
        schedule = TaskSchedule(list(built.tasks), [float(e["weight"]) for e in cfg["tasks"]],
                                st["task_schedule"], cfg["run"]["seed"])
    return TaskData(built.task, mode="opd" if stage == "opd" else "sft",
                    batch_size=st["prompts_per_step"] if stage == "opd" else st["batch_size"],
                    steps=steps, seed=cfg["run"]["seed"],
                    tokenizer=spec.tokenizer, chat_template=spec.node["chat_template"], start=start,
                    schedule=schedule)


def _sharded(trainer: L.Trainer) -> bool:
    """Whether the trained parameters live in shards across processes (FSDP, DeepSpeed)."""
    name = type(trainer.strategy).__name__.lower()
    return any(w in name for w in ("fsdp", "deepspeed", "modelparallel"))


class RunInterrupted(Exception):
    """Ctrl-C stopped a stage; the message says where and how to continue."""


class Runner:
    def __init__(self, cfg: dict[str, Any], built: BuiltRun | None = None) -> None:
        self.cfg = cfg
        self.built = built or build_run(cfg)
        self.run_dir = Path(cfg["run"]["out_dir"]) / cfg["run"]["name"]
        self.main = dist.is_main()
        self.log: Callable[[str], None] = print if self.main else (lambda _msg: None)
        self.current = ""  # the stage running now (for messages about an interruption)
        self.tag = ""  # a multi-task run's per-task teacher runner: the task's label (folder names)
        self.task_key = ""  # and the prefix of its keys ("tasks.1.")

    def _name(self, stage: str) -> str:
        """The folder name of a stage's logs, checkpoints and rollouts."""
        return f"{stage}_{self.tag}" if self.tag else stage

    def _seed(self, stage: str) -> None:
        """Each stage starts from its own seed, so a stage gives the same result whether the
        stages before it ran now or came from the cache."""
        L.seed_everything(self.cfg["run"]["seed"] + 1000 * STAGES.index(stage), workers=True, verbose=False)

    # -- decisions rank 0 takes ----------------------------------------------------------------
    def _resume_point(self, stage: str, fp: str, frame: str = "", shared: bool = False) -> tuple[str | None, dict | None]:
        """The stage's last checkpoint if it was written for this fingerprint, or (the stage stopped on
        a non-finite step) for this config with other optimizer keys (then also what continues: the
        step and the keys that changed, for stage.json); any other is set aside (renamed), with the
        reason. ``frame``: the fingerprint without the stage's optimizer keys; ``shared``: the stage's
        folder is in run.stage_cache, which keeps only results of one config (no continuing there)."""
        path = checkpoint_dir(self.run_dir, self._name(stage)) / "last.ckpt"
        stopped = path.parent / STOPPED
        if not self.cfg["run"]["checkpoints"] or not path.is_file():
            return None, None
        continued = None
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            meta = ck.get("opdlm", {})
            step = ck.get("global_step", "?")
            bad = first_nonfinite(ck.get("state_dict", {}).items())
            del ck
        except Exception as e:  # a damaged file: say so and start over
            reason, meta, step = f"unreadable ({type(e).__name__})", None, None
        else:
            reason = None if meta.get("fingerprint") == fp else (
                f"written for another config or code (fingerprint {meta.get('fingerprint') or 'none'}, now {fp})")
            if reason and stopped.is_file() and frame and meta.get("frame") == frame and not shared:
                old, new = meta.get("optimizer", {}), {k: self.cfg["stages"][stage][k] for k in OPTIMIZER_KEYS}
                changed = {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v}
                continued, reason = {"from_fingerprint": meta.get("fingerprint"), "at_step": step, "changed": changed}, None
            if bad:
                reason = f"its weights hold non-finite values ({bad})"
        if reason is None:
            if continued is None:
                self.log(f"[opdlm] stage {stage}: resuming from {path} (optimizer step {step})")
            else:
                diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in continued["changed"].items())
                self.log(f"[opdlm] stage {stage}: continuing the stage stopped on a non-finite step from {path} "
                         f"(optimizer step {step}) with other optimizer settings ({diff})")
            return str(path), continued
        aside = path.with_name(f"last.ckpt.{time.strftime('%Y%m%d-%H%M%S')}.set-aside")
        path.rename(aside)
        stopped.unlink(missing_ok=True)
        self.log(f"[opdlm] stage {stage}: not resuming from {path}: {reason}; moved to {aside.name}, "
                 f"the stage starts from step 0")
        return None, None

    # -- one stage ------------------------------------------------------------------------------
    def _stage(self, stage: str, folder: Path, build: Callable[[], L.LightningModule], model_of: Callable[[Any], nn.Module],
               spec: Any, steps: int, describe: Callable[[Any], str],
               every: int | None = None) -> dict[str, Any]:
        fp, efp = fingerprint(self.cfg, stage, self.built), eval_fingerprint(self.cfg, stage, self.built)
        lock = None
        if self.main and self.cfg["run"]["stage_cache"] and folder.parent != self.run_dir:  # a shared cache entry
            lock = Lock(folder.with_name(f".{folder.name}.lock"), str(folder), wait=True)
        try:
            state, info = dist.broadcast(lookup(stage, folder, fp, efp, self.log) if self.main else None)
            if state == "cached":
                return info | {"folder": str(folder.resolve())}
            if state == "evaluate":
                return self._evaluate_again(stage, folder, info, efp, spec) | {"folder": str(folder.resolve())}
            return self._compute(stage, folder, build, model_of, spec, steps, describe, every, fp, efp)
        finally:
            if lock is not None:
                lock.release()

    def _evaluate_again(self, stage: str, folder: Path, info: dict[str, Any], efp: str, spec: Any) -> dict[str, Any]:
        """New test metrics for a cached model (only the evaluation settings changed)."""
        t0 = time.time()
        self.current = stage
        model = load_weights(folder, f"stage folder {folder}", getattr(torch, spec.node["dtype"])).to(self._device())
        metrics = evaluate(model, spec.tokenizer, self.built, self.cfg, spec.node["chat_template"], "test",
                           progress=self.cfg["trainer"]["progress_bar"])
        evaluations = {**info.get("evaluations", {}), efp: {"test": metrics, "seconds": round(time.time() - t0, 3)}}
        info = info | {"evaluations": evaluations}
        if self.main:
            write_json(folder / "stage.json", info)
        dist.barrier()
        return info | {"test": metrics, "eval_fingerprint": efp,
                       "seconds": round(info.get("train_seconds", 0.0) + evaluations[efp]["seconds"], 3)}

    def _device(self) -> torch.device:
        acc = str(self.cfg["trainer"]["accelerator"])
        if torch.cuda.is_available() and acc in ("auto", "gpu", "cuda"):
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    def _compute(self, stage: str, folder: Path, build: Callable[[], L.LightningModule],
                 model_of: Callable[[Any], nn.Module], spec: Any, steps: int, describe: Callable[[Any], str],
                 every: int | None, fp: str, efp: str) -> dict[str, Any]:
        t0 = time.time()
        # written under a name of its own (one per writing process), renamed into place when complete
        tmp = Path(dist.broadcast(str(folder.with_name(f".{folder.name}.tmp-{os.getpid()}"))))
        if self.main:
            remove_stale(folder)
        frame = fingerprint(self.cfg, stage, self.built, frame=True)
        ckpt, continued = dist.broadcast(self._resume_point(stage, fp, frame, shared=folder.parent != self.run_dir)
                                         if self.main else None)
        if self.main and ckpt is None:
            shutil.rmtree(self.run_dir / "logs" / self._name(stage), ignore_errors=True)  # this stage is computed anew
        dist.barrier()
        self._seed(stage)
        module = build()
        module.fingerprint, module.frame = fp, frame
        if self.tag:  # a task's own teacher: its keys and label in the guard's messages
            module.guard.key, module.guard.label = f"{self.task_key}teacher_sft", self.tag
        module.rollout_dir = self.run_dir / "rollouts" / self._name(stage) if self.main else None
        data = _data(self.built, self.cfg, stage, spec, start=lambda: module.batches_done)
        trainer = make_trainer(self.cfg, self.run_dir, stage, steps, every, name=self._name(stage))
        self.log(f"[opdlm] stage {stage}{f' ({self.tag})' if self.tag else ''}: {describe(module)}"
                 + (f", on {dist.world()} processes" if dist.world() > 1 else ""))
        self.current = stage
        if steps > 0:
            try:
                trainer.fit(module, datamodule=data, ckpt_path=ckpt)
            except SystemExit:  # Lightning exits this way after Ctrl-C
                if trainer.interrupted:
                    raise RunInterrupted(self._interrupted(stage, trainer.global_step, steps)) from None
                raise
        if self.main:
            (checkpoint_dir(self.run_dir, self._name(stage)) / STOPPED).unlink(missing_ok=True)
        skipped = module.guard.skipped
        if skipped:
            self.log(f"[opdlm] stage {stage}: {skipped} optimizer steps were skipped (a non-finite loss or gradient; "
                     f"{module.guard.key}.nonfinite=skip)")
        model = self._export(trainer, module, model_of(module), spec.tokenizer, tmp, trained=steps > 0, stage=stage)
        t1 = time.time()
        metrics = evaluate(model, spec.tokenizer, self.built, self.cfg, spec.node["chat_template"], "test",
                           progress=self.cfg["trainer"]["progress_bar"])
        t2 = time.time()
        info = {"stage": stage, "fingerprint": fp, "train_seconds": round(t1 - t0, 3),
                "evaluations": {efp: {"test": metrics, "seconds": round(t2 - t1, 3)}},
                "params": n_params(model), "processes": dist.world(), **({"skipped_steps": skipped} if skipped else {}),
                **({"continued": continued} if continued else {})}
        if self.main:
            info["files"] = file_digests(tmp)
            write_json(tmp / "stage.json", info)
            replace_folder(tmp, folder)
        dist.barrier()
        seconds = round(info["train_seconds"] + info["evaluations"][efp]["seconds"], 3)  # as a cached lookup sums them
        return info | {"test": metrics, "eval_fingerprint": efp, "seconds": seconds, "folder": str(folder.resolve())}

    def _interrupted(self, stage: str, step: int, steps: int) -> str:
        path = checkpoint_dir(self.run_dir, self._name(stage)) / "last.ckpt"
        if self.cfg["run"]["checkpoints"] and path.is_file():
            how = f"the same command continues it from {path}"
        else:
            how = "no checkpoint was written yet (run.checkpoint_every), so the same command starts it again"
        return f"interrupted (Ctrl-C) in stage {stage} at optimizer step {step} of {steps}; {how}"

    def _export(self, trainer: L.Trainer, module: L.LightningModule, model: nn.Module, tokenizer: Any,
                tmp: Path, trained: bool, stage: str) -> nn.Module:
        """Rank 0 saves the trained model as a Hugging Face folder in ``tmp``; returns the model the
        test evaluation uses (sharded parameters are gathered and reloaded on every rank). Weights
        that are not finite are never saved (NonFiniteError, on every rank)."""
        def refuse(bad: str | None) -> None:
            bad = dist.broadcast(bad)
            if bad:
                raise NonFiniteError(f"stage {stage}: the trained weights hold non-finite values ({bad}); no stage "
                                     f"folder was written")

        if not trained or not _sharded(trainer):
            refuse(first_nonfinite(model.state_dict().items()) if self.main else None)
            if self.main:
                save_hf(model, tokenizer, tmp)
            dist.barrier()
            return model.to(trainer.strategy.root_device)
        state = trainer.strategy.lightning_module_state_dict()  # a collective: every rank calls it
        prefix = next(n for n, m in module.named_children() if m is model) + "."
        refuse(first_nonfinite(state.items()) if self.main else None)
        if self.main:
            from transformers import AutoModelForCausalLM
            full = AutoModelForCausalLM.from_config(model.config)
            full.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            full.generation_config = model.generation_config
            save_hf(full, tokenizer, tmp)
        dist.barrier()
        from transformers import AutoModelForCausalLM
        loaded = AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True)
        return loaded.to(module.device)

    def sft(self, role: str, init: str | None) -> dict[str, Any]:
        stage = f"{role}_sft"
        folder = self.run_dir / self._name(role) if role == "teacher" else self.run_dir / "student_sft"
        if self.cfg["run"]["stage_cache"]:  # shared between runs (sweeps): keyed by fingerprint
            folder = Path(self.cfg["run"]["stage_cache"]) / f"{stage}-{fingerprint(self.cfg, stage, self.built)}"
        spec = self.built.teacher if role == "teacher" else self.built.student
        st = self.cfg["stages"][stage]
        seed = self.cfg["run"]["seed"] + (1 if role == "teacher" else 0)

        def build() -> SFTModule:
            return SFTModule(self.cfg, role, init, built=self.built, model=load_or_build(spec, init, seed))

        return self._stage(stage, folder, build, lambda m: m.model, spec, st["steps"],
                           lambda m: f"{n_params(m.model):,} parameters, {st['steps']} steps of {st['batch_size']} sequences")

    def _task_runners(self) -> dict[str, Runner]:
        """A multi-task run's runner per task (its config and run, folders tagged with its label),
        for the task's own teacher stage; empty for a single-task run."""
        from opdlm.multitask import task_config
        out = {}
        for i, (label, run) in enumerate((self.built.tasks or {}).items()):
            out[label] = Runner(task_config(self.cfg, i), built=run)
            out[label].tag, out[label].task_key = label, f"tasks.{i}."
        return out

    def _teachers(self) -> dict[str, Any]:
        """A multi-task run's teachers, each its task's own teacher stage (folder teacher_<label>),
        as one result: each task's test metrics by its own teacher (opdlm.multitask.merged_metrics)."""
        from opdlm.multitask import merged_metrics
        results = {label: sub.sft("teacher", sub.cfg["teacher"]["path"]) for label, sub in self._task_runners().items()}
        return {"test": merged_metrics({k: r["test"] for k, r in results.items()}, "test"),
                "folders": {k: r["folder"] for k, r in results.items()},
                "folder": str(self.run_dir), "seconds": round(sum(r.get("seconds", 0.0) for r in results.values()), 3)}

    def opd(self, student_init: str, teacher_init: str | dict[str, str]) -> dict[str, Any]:
        st = self.cfg["stages"]["opd"]

        def build() -> OPDModule:
            return OPDModule(self.cfg, student_init, teacher_init, built=self.built)

        def describe(_m: Any) -> str:
            return (f"loss {self.cfg['loss']['name']}, support {self.cfg['support']['name']}, {st['steps']} steps of "
                    f"{st['prompts_per_step']} prompts x {self.built.sampler.n} rollouts")

        return self._stage("opd", self.run_dir / "student", build, lambda m: m.student, self.built.student,
                           st["steps"], describe, every=self.cfg["run"]["checkpoint_every"] * st["mini_batches"])

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg["trainer"]["threads"]:
            torch.set_num_threads(cfg["trainer"]["threads"])
        quiet_libraries()
        lock, problem = None, None
        if self.main:
            try:
                lock = Lock(self.run_dir / ".lock", f"run folder {self.run_dir}", wait=False)
                problem = self._claim_folder()
            except FolderBusy as e:
                problem = str(e)
        problem = dist.broadcast(problem)
        if problem:
            if lock is not None:
                lock.release()
            raise FolderBusy(problem)
        try:
            return self._run_stages()
        finally:
            if lock is not None:
                lock.release()

    def _config_fingerprints(self) -> dict[str, list[str]]:
        """Per stage, the training and evaluation fingerprints of the config alone (the code left out:
        a re-run of the same config after a code change updates its own result)."""
        return {s: [fingerprint(self.cfg, s, self.built, code=False), eval_fingerprint(self.cfg, s, self.built, code=False)]
                for s in STAGES}

    def _claim_folder(self) -> str | None:
        """Make the run folder this config's: None, or why it cannot be (it holds the finished result
        of another config and run.overwrite is false). Files of another config are removed first,
        so the folder never shows a config.yaml and results that disagree."""
        results, config = self.run_dir / "results.json", self.run_dir / "config.yaml"
        if results.is_file():
            try:
                old = json.loads(results.read_text()).get("config_fingerprints")
            except (OSError, ValueError, AttributeError):
                old = None
            if old != self._config_fingerprints():
                if not self.cfg["run"]["overwrite"]:
                    diff = config_diff(config, self.cfg)
                    return (f"{self.run_dir} holds the finished result of another config{diff}; choose another "
                            f"run.name, or set run.overwrite=true to replace it")
                self.log(f"[opdlm] {self.run_dir}: replacing the finished result of another config (run.overwrite)")
                self._remove_other_stages()
            for f in ("results.json", "results.md"):
                (self.run_dir / f).unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config.write_text(to_yaml(self.cfg))
        return None

    def _remove_other_stages(self) -> None:
        """Remove the run folder's stage folders made for another config (they would be recomputed
        anyway); the folder then holds nothing that disagrees with its config.yaml."""
        own = {"teacher": ("teacher_sft", self.cfg, self.built)}
        for sub in self._task_runners().values():  # each task's own teacher stage
            own[sub._name("teacher")] = ("teacher_sft", sub.cfg, sub.built)
        own.update({"student_sft": ("student_sft", self.cfg, self.built), "student": ("opd", self.cfg, self.built)})
        for name, (stage, cfg, built) in own.items():
            folder = self.run_dir / name
            try:
                fp = json.loads((folder / "stage.json").read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                fp = None
            if folder.is_dir() and fp != fingerprint(cfg, stage, built):
                shutil.rmtree(folder)

    def _run_stages(self) -> dict[str, Any]:
        cfg = self.cfg
        dist.barrier()
        if any(self.built.dropped.values()):
            counts = ", ".join(f"{n} {s}" for s, n in self.built.dropped.items())
            self.log(f"[opdlm] data.too_long=skip: left out {counts} examples longer than the models' positions")
        L.seed_everything(cfg["run"]["seed"], workers=True, verbose=False)
        t0 = time.time()
        if self.built.tasks:  # one teacher per task, each trained on (or loaded for) its own task
            teacher = self._teachers()
            student = self.sft("student", cfg["student"]["path"])
            after = self.opd(student["folder"], teacher["folders"])
        else:
            teacher = self.sft("teacher", cfg["teacher"]["path"])
            student = self.sft("student", cfg["student"]["path"])
            after = self.opd(student["folder"], teacher["folder"])
        stages = (teacher, student, after)
        results = {"seed": cfg["run"]["seed"], "teacher": teacher, "student_before": student,
                   "student_after": after, "processes": dist.world(), "config_fingerprints": self._config_fingerprints(),
                   "seconds": round(sum(x.get("seconds", 0.0) for x in stages), 3),
                   "wall_seconds": round(time.time() - t0, 3)}
        if self.main:
            table = results_table(results, cfg)
            write_json(self.run_dir / "results.json", results)
            (self.run_dir / "results.md").write_text(table + "\n")
            self.log("\n" + table)
            self.log(f"\n[opdlm] run folder: {self.run_dir}  (student exported to {after['folder']})")
        dist.barrier()
        return results
