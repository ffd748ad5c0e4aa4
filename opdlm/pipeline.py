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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from opdlm import dist, signals
from opdlm.builder import BuiltRun, build_run
from opdlm.cache import FolderBusy, Lock, file_digests, lookup, remove_stale, replace_folder, resume_point, write_json
from opdlm.config import to_yaml
from opdlm.data import TaskData
from opdlm.evaluation import evaluate, merged_metrics
from opdlm.fingerprint import eval_fingerprint, fingerprint
from opdlm.guard import STOPPED, NonFiniteError, first_nonfinite
from opdlm.models import load_weights, n_params, save_hf
from opdlm.module import OPDModule
from opdlm.optim import OPTIMIZER_KEYS
from opdlm.results import config_diff, results_table
from opdlm.sft import SFTModule
from opdlm.stages import seed_stage, sft_module, stage_data
from opdlm.trainer import checkpoint_dir, make_trainer, quiet_libraries

__all__ = ["FolderBusy", "RunInterrupted", "Runner"]


def _sharded(trainer: L.Trainer) -> bool:
    """Whether the trained parameters live in shards across processes (FSDP, DeepSpeed)."""
    name = type(trainer.strategy).__name__.lower()
    return any(w in name for w in ("fsdp", "deepspeed", "modelparallel"))


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped a stage (opdlm.signals); the message says where and how to continue."""


@dataclass
class Plan:
    """One stage to run: its name, the task of a teacher stage (its label; None for the student's
    stages), its folder, its stage node, the model it trains (``spec``, ``build``: the module,
    ``model_of``: the model in it) and how its first line describes it."""

    stage: str
    task: str | None
    folder: Path
    node: dict[str, Any]
    spec: Any
    build: Callable[[], L.LightningModule]
    model_of: Callable[[Any], nn.Module]
    describe: Callable[[Any], str]
    every: int | None = None  # optimizer steps between checkpoints (default: run.checkpoint_every)


class Runner:
    """Runs the stages of one run in its folder (see the module docstring); ``run`` is the entry point."""

    def __init__(self, cfg: dict[str, Any], built: BuiltRun | None = None) -> None:
        self.cfg = cfg
        self.built = built or build_run(cfg)
        self.run_dir = Path(cfg["run"]["out_dir"]) / cfg["run"]["name"]
        self.main = dist.is_main()
        self.log: Callable[[str], None] = print if self.main else (lambda _msg: None)
        self.current = ""  # the stage running now (for messages about an interruption)

    def _name(self, stage: str, task: str | None = None) -> str:
        """The folder name of a stage's logs, checkpoints and rollouts (a task's teacher in a run of
        several tasks: with its label)."""
        return f"{stage}_{task}" if task is not None and self.built.several else stage

    def _seed(self, stage: str) -> None:
        """Each stage starts from its own seed, so a stage gives the same result whether the
        stages before it ran now or came from the cache."""
        seed_stage(self.cfg, stage)

    def _fingerprints(self, plan: Plan, code: bool = True) -> tuple[str, str]:
        return (fingerprint(self.cfg, plan.stage, self.built, code, task=plan.task),
                eval_fingerprint(self.cfg, plan.stage, self.built, code, task=plan.task))

    # -- decisions rank 0 takes ----------------------------------------------------------------
    def _resume_point(self, plan: Plan, fp: str, frame: str = "") -> tuple[str | None, dict | None]:
        """The stage's checkpoint to go on from, if any (opdlm.cache.resume_point; a stage whose folder
        is in run.stage_cache, which keeps only results of one config, never continues under changed
        optimizer keys)."""
        if not self.cfg["run"]["checkpoints"]:
            return None, None
        path = checkpoint_dir(self.run_dir, self._name(plan.stage, plan.task)) / "last.ckpt"
        now = {k: plan.node[k] for k in OPTIMIZER_KEYS}
        return resume_point(path, plan.stage, fp, frame if plan.folder.parent == self.run_dir else "", now, self.log)

    # -- one stage ------------------------------------------------------------------------------
    def _stage(self, plan: Plan) -> dict[str, Any]:
        if plan.spec.served:  # a served teacher: nothing to train or save here, and it is not evaluated
            self.log(f"[opdlm] stage {plan.stage}{f' ({plan.task})' if self.built.several else ''}: the teacher is "
                     f"served at {plan.spec.served}")
            return {"test": {}, "folder": None, "served": plan.spec.served, "seconds": 0.0}
        fp, efp = self._fingerprints(plan)
        folder, lock = plan.folder, None
        if self.main and self.cfg["run"]["stage_cache"] and folder.parent != self.run_dir:  # a shared cache entry
            lock = Lock(folder.with_name(f".{folder.name}.lock"), str(folder), wait=True)
        try:
            state, info = dist.broadcast(lookup(plan.stage, folder, fp, efp, self.log) if self.main else None)
            if state == "cached":
                return info | {"folder": str(folder.resolve())}
            if state == "evaluate":
                return self._evaluate_again(plan, info, efp) | {"folder": str(folder.resolve())}
            return self._compute(plan, fp, efp)
        finally:
            if lock is not None:
                lock.release()

    def _test(self, plan: Plan, model: nn.Module) -> dict[str, float]:
        """The test metrics of a stage's model: on its own task (a teacher), or on every task."""
        return evaluate(model, plan.spec.tokenizer, self.built, self.cfg, plan.spec.node["chat_template"], "test",
                        progress=self.cfg["trainer"]["progress_bar"], task=plan.task)

    def _evaluate_again(self, plan: Plan, info: dict[str, Any], efp: str) -> dict[str, Any]:
        """New test metrics for a cached model (only the evaluation settings changed)."""
        t0 = time.time()
        self.current = plan.stage
        folder = plan.folder
        model = load_weights(folder, f"stage folder {folder}", getattr(torch, plan.spec.node["dtype"])).to(self._device())
        metrics = self._test(plan, model)
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

    def _data(self, plan: Plan, start: Callable[[], int]) -> TaskData:
        """The stage's batches (opdlm.stages.stage_data)."""
        return stage_data(self.cfg, self.built, plan.stage, plan.task, start)

    def _compute(self, plan: Plan, fp: str, efp: str) -> dict[str, Any]:
        t0 = time.time()
        stage, folder, name, steps = plan.stage, plan.folder, self._name(plan.stage, plan.task), plan.node["steps"]
        # written under a name of its own (one per writing process), renamed into place when complete
        tmp = Path(dist.broadcast(str(folder.with_name(f".{folder.name}.tmp-{os.getpid()}"))))
        if self.main:
            remove_stale(folder)
        frame = fingerprint(self.cfg, stage, self.built, frame=True, task=plan.task)
        ckpt, continued = dist.broadcast(self._resume_point(plan, fp, frame) if self.main else None)
        if self.main and ckpt is None:
            shutil.rmtree(self.run_dir / "logs" / name, ignore_errors=True)  # this stage is computed anew
        dist.barrier()
        self._seed(stage)
        module = plan.build()
        module.fingerprint, module.frame = fp, frame
        module.rollout_dir = self.run_dir / "rollouts" / name if self.main else None
        module.rollout_dir_set = True  # (every rank: the other ranks score with rank 0 where the student is sharded)
        data = self._data(plan, start=lambda: module.batches_done)
        trainer = make_trainer(self.cfg, self.run_dir, stage, steps, plan.every, name=name)
        self.log(f"[opdlm] stage {stage}{f' ({plan.task})' if name != stage else ''}: {plan.describe(module)}"
                 + (f", on {dist.world()} processes" if dist.world() > 1 else ""))
        self.current = stage
        if steps > 0:
            try:
                trainer.fit(module, datamodule=data, ckpt_path=ckpt)
            except SystemExit:  # Lightning exits this way after Ctrl-C
                if trainer.interrupted:
                    raise RunInterrupted(self._interrupted(plan, trainer.global_step)) from None
                raise
        if self.main:
            (checkpoint_dir(self.run_dir, name) / STOPPED).unlink(missing_ok=True)
        skipped = module.guard.skipped
        if skipped:
            self.log(f"[opdlm] stage {stage}: {skipped} optimizer steps were skipped (a non-finite loss or gradient; "
                     f"{module.guard.key}.nonfinite=skip)")
        model = self._export(trainer, module, plan.model_of(module), plan.spec.tokenizer, tmp, trained=steps > 0,
                             stage=stage)
        t1 = time.time()
        metrics = self._test(plan, model)
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

    def _interrupted(self, plan: Plan, step: int) -> str:
        path = checkpoint_dir(self.run_dir, self._name(plan.stage, plan.task)) / "last.ckpt"
        if self.cfg["run"]["checkpoints"] and path.is_file():
            how = f"the same command continues it from {path}"
        else:
            how = "no checkpoint was written yet (run.checkpoint_every), so the same command starts it again"
        return f"{signals.cause()} in stage {plan.stage} at optimizer step {step} of {plan.node['steps']}; {how}"

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
            full = AutoModelForCausalLM.from_config(model.config)
            full.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            full.generation_config = model.generation_config
            save_hf(full, tokenizer, tmp)
        dist.barrier()
        loaded = AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True)
        return loaded.to(module.device)

    # -- the stages ----------------------------------------------------------------------------------
    def _plans(self) -> list[Plan]:
        """Every stage of the run, in order: each task's teacher SFT, the student's SFT, OPD."""
        return [*(self._sft_plan("teacher", label) for label in self.built.tasks), self._sft_plan("student"),
                self._opd_plan()]

    def _sft_plan(self, role: str, task: str | None = None) -> Plan:
        stage = f"{role}_sft"
        own = self.built.tasks[task] if task is not None else None
        spec = own.teacher if own is not None else self.built.student
        node = (own.cfg if own is not None else self.cfg)["stages"][stage]
        init = spec.node["path"]
        folder = self.run_dir / (self._name("teacher", task) if own is not None else "student_sft")
        if self.cfg["run"]["stage_cache"]:  # shared between runs (sweeps): keyed by fingerprint
            folder = Path(self.cfg["run"]["stage_cache"]) / f"{stage}-{fingerprint(self.cfg, stage, self.built, task=task)}"

        def build() -> SFTModule:
            return sft_module(self.cfg, self.built, role, task, init)

        return Plan(stage, task, folder, node, spec, build, lambda m: m.model,
                    lambda m: f"{n_params(m.model):,} parameters, {node['steps']} steps of {node['batch_size']} sequences")

    def _opd_plan(self, student_init: str | None = None, teacher_init: dict[str, str] | None = None) -> Plan:
        st = self.cfg["stages"]["opd"]

        def build() -> OPDModule:
            return OPDModule(self.cfg, student_init, teacher_init, built=self.built)

        def describe(_m: Any) -> str:
            n = "/".join(str(k) for k in sorted({t.sampler.n for t in self.built.tasks.values()}))
            return (f"loss {self.cfg['loss']['name']}, support {self.cfg['support']['name']}, {st['steps']} steps of "
                    f"{st['prompts_per_step']} prompts x {n} rollouts")

        return Plan("opd", None, self.run_dir / "student", st, self.built.student, build, lambda m: m.student, describe,
                    every=self.cfg["run"]["checkpoint_every"] * st["num_mini_batches"])

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
        """Per stage (a teacher stage per task in a run of several), the training and evaluation
        fingerprints of the config alone (the code left out: a re-run of the same config after a code
        change updates its own result)."""
        return {self._name(p.stage, p.task): list(self._fingerprints(p, code=False)) for p in self._plans()}

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
        for plan in self._plans():
            folder = self.run_dir / plan.folder.name
            try:
                fp = json.loads((folder / "stage.json").read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                fp = None
            if folder.is_dir() and fp != self._fingerprints(plan)[0]:
                shutil.rmtree(folder)

    def _run_stages(self) -> dict[str, Any]:
        cfg = self.cfg
        dist.barrier()
        for line in self.built.summaries():
            self.log(f"[opdlm] {line}")
        if any(self.built.dropped.values()):
            counts = ", ".join(f"{n} {s}" for s, n in self.built.dropped.items())
            self.log(f"[opdlm] data.too_long=skip: left out {counts} examples longer than the models' positions")
        L.seed_everything(cfg["run"]["seed"], workers=True, verbose=False)
        t0 = time.time()
        teachers = {label: self._stage(self._sft_plan("teacher", label)) for label in self.built.tasks}
        student = self._stage(self._sft_plan("student"))
        after = self._stage(self._opd_plan(student["folder"], {label: r["folder"] for label, r in teachers.items()}))
        teacher = teachers[next(iter(teachers))]
        if self.built.several:  # the teachers as one result: each task's metrics by its own teacher
            teacher = {"test": merged_metrics({k: r["test"] for k, r in teachers.items()}, "test"),
                       "folders": {k: r["folder"] for k, r in teachers.items()}, "folder": str(self.run_dir),
                       "seconds": round(sum(r.get("seconds", 0.0) for r in teachers.values()), 3)}
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
