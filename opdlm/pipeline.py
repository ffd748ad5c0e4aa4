"""Run the stages of an experiment in its run folder ``runs/<name>/``:

teacher SFT -> student SFT (cold start) -> on-policy distillation -> test evaluation of the
teacher, the student before OPD and the student after OPD. Each finished stage leaves a Hugging
Face folder and a ``stage.json`` (config fingerprint + test metrics); a re-run with the same
stage config skips it and says so.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from opdlm.build import Plan, build_plan
from opdlm.config import to_yaml
from opdlm.data import TaskData
from opdlm.models import n_params, save_hf
from opdlm.module import OPDModule, SFTModule, load_or_build

STAGES = ("teacher_sft", "student_sft", "opd")


def vocab_digest(tokenizer: Any) -> str:
    blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(cfg: dict[str, Any], stage: str, plan: Plan) -> str:
    """Hash of the config parts a stage's result depends on (earlier stages included), and of
    the tokenizers' vocabularies."""
    parts: dict[str, Any] = {"seed": cfg["run"]["seed"], "task": cfg["task"], "teacher": cfg["teacher"],
                             "teacher_vocab": vocab_digest(plan.teacher.tokenizer),
                             "teacher_sft": cfg["stages"]["teacher_sft"], "eval": cfg["eval"],
                             "precision": cfg["trainer"]["precision"]}
    if stage in ("student_sft", "opd"):
        parts.update(student=cfg["student"], student_sft=cfg["stages"]["student_sft"],
                     student_vocab=vocab_digest(plan.student.tokenizer))
    if stage == "opd":
        parts.update({k: cfg[k] for k in ("sampler", "aligner", "support", "maskers", "loss")})
        parts["opd"] = cfg["stages"]["opd"]
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _loggers(cfg: dict[str, Any], run_dir: Path, stage: str) -> list[Any]:
    loggers: list[Any] = [CSVLogger(str(run_dir / "logs"), name=stage, version="")]
    if cfg["run"]["tensorboard"]:
        try:
            import tensorboard  # noqa: F401
            from lightning.pytorch.loggers import TensorBoardLogger
            loggers.append(TensorBoardLogger(str(run_dir / "tb"), name=stage, version=""))
        except ImportError:
            pass
    return loggers


def make_trainer(cfg: dict[str, Any], run_dir: Path, stage: str, steps: int, val_every: int) -> L.Trainer:
    tr = cfg["trainer"]
    shutil.rmtree(run_dir / "logs" / stage, ignore_errors=True)  # this stage is being recomputed
    callbacks: list[Any] = [TQDMProgressBar()] if tr["progress_bar"] else []
    if cfg["run"]["checkpoints"]:
        callbacks.append(ModelCheckpoint(dirpath=str(run_dir / "checkpoints" / stage), save_last=True,
                                         save_top_k=0, every_n_train_steps=max(1, val_every or steps)))
    return L.Trainer(
        accelerator=tr["accelerator"], devices=tr["devices"], strategy=tr["strategy"],
        precision=tr["precision"], max_steps=steps, max_epochs=-1,
        val_check_interval=val_every if val_every and val_every < steps else None,
        check_val_every_n_epoch=None if val_every and val_every < steps else 1,
        num_sanity_val_steps=0, limit_val_batches=1.0 if val_every else 0,
        log_every_n_steps=tr["log_every_n_steps"], enable_progress_bar=tr["progress_bar"],
        enable_model_summary=False, logger=_loggers(cfg, run_dir, stage), callbacks=callbacks,
        gradient_clip_val=cfg["stages"][stage]["max_grad_norm"] if stage != "opd" else None,
        default_root_dir=str(run_dir), enable_checkpointing=cfg["run"]["checkpoints"],
    )


def _data(plan: Plan, cfg: dict[str, Any], stage: str, spec: Any) -> TaskData:
    st = cfg["stages"][stage]
    ev = cfg["eval"]
    return TaskData(plan.task, mode="opd" if stage == "opd" else "sft",
                    batch_size=st["prompts_per_step"] if stage == "opd" else st["batch_size"],
                    steps=st["steps"], seed=cfg["run"]["seed"], eval_batch_size=ev["batch_size"],
                    val_prompts=ev["val_prompts"], test_prompts=ev["test_prompts"],
                    tokenizer=spec.tokenizer, chat_template=spec.node["chat_template"])


def _test(cfg: dict[str, Any], module: L.LightningModule, data: TaskData) -> dict[str, float]:
    """Test-split metrics (kept in stage.json and results.json, not in the training logs)."""
    tr = cfg["trainer"]
    trainer = L.Trainer(accelerator=tr["accelerator"], devices=1, precision=tr["precision"], logger=False,
                        enable_progress_bar=tr["progress_bar"], enable_model_summary=False,
                        callbacks=[TQDMProgressBar()] if tr["progress_bar"] else [],
                        enable_checkpointing=False)
    res = trainer.test(module, datamodule=data, verbose=False)
    return {k: float(v) for k, v in (res[0] if res else {}).items()}


def quiet_libraries() -> None:
    """Keep the console for opdlm's own lines, the progress bar and real warnings: drop library
    banners, per-file loading bars and warnings that do not apply to how opdlm drives Lightning."""
    import logging

    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for msg in (".*does not have many workers.*", ".*`training_step` returns `None`.*",
                ".*ModelCheckpoint with manual optimization.*", ".*module\\(s\\) in eval mode.*",
                ".*overridden `transfer_batch_to_device`.*", ".*LeafSpec.*",
                ".*smaller than the logging interval.*", ".*Found keys that are in the model state dict but not in the checkpoint.*"):
        warnings.filterwarnings("ignore", message=msg)


class Runner:
    def __init__(self, cfg: dict[str, Any], plan: Plan | None = None) -> None:
        self.cfg = cfg
        self.plan = plan or build_plan(cfg)
        self.run_dir = Path(cfg["run"]["out_dir"]) / cfg["run"]["name"]
        self.log = print

    def _seed(self, stage: str) -> None:
        """Each stage starts from its own seed, so a stage gives the same result whether the
        stages before it ran now or came from the cache."""
        L.seed_everything(self.cfg["run"]["seed"] + 1000 * STAGES.index(stage), workers=True, verbose=False)

    def _cached(self, stage: str, folder: Path) -> dict[str, Any] | None:
        marker = folder / "stage.json"
        if not marker.is_file():
            return None
        info = json.loads(marker.read_text())
        if info.get("fingerprint") == fingerprint(self.cfg, stage, self.plan):
            self.log(f"[opdlm] stage {stage}: cached in {folder} (same config), skipping")
            return info
        self.log(f"[opdlm] stage {stage}: config changed since {folder} was made, running it again")
        return None

    def _finish(self, stage: str, folder: Path, model: Any, tokenizer: Any, metrics: dict[str, float],
                seconds: float) -> dict[str, Any]:
        info = {"stage": stage, "fingerprint": fingerprint(self.cfg, stage, self.plan), "test": metrics,
                "seconds": round(seconds, 1), "params": n_params(model)}
        save_hf(model, tokenizer, folder)
        (folder / "stage.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        return info

    def sft(self, role: str, init: str | None) -> dict[str, Any]:
        stage = f"{role}_sft"
        folder = self.run_dir / role if role == "teacher" else self.run_dir / "student_sft"
        if self.cfg["run"]["stage_cache"]:  # shared between runs (sweeps): keyed by fingerprint
            folder = Path(self.cfg["run"]["stage_cache"]) / f"{stage}-{fingerprint(self.cfg, stage, self.plan)}"
        cached = self._cached(stage, folder)
        if cached:
            return cached | {"folder": str(folder.resolve())}
        spec = self.plan.teacher if role == "teacher" else self.plan.student
        st = self.cfg["stages"][stage]
        t0 = time.time()
        self._seed(stage)
        module = SFTModule(self.cfg, role, init, plan=self.plan,
                           model=load_or_build(spec, init, self.cfg["run"]["seed"] + (1 if role == "teacher" else 0)))
        data = _data(self.plan, self.cfg, stage, spec)
        trainer = make_trainer(self.cfg, self.run_dir, stage, st["steps"], st["val_every"])
        self.log(f"[opdlm] stage {stage}: {n_params(module.model):,} parameters, {st['steps']} steps")
        if st["steps"] > 0:
            trainer.fit(module, datamodule=data)
        metrics = _test(self.cfg, module, data)
        info = self._finish(stage, folder, module.model, spec.tokenizer, metrics, time.time() - t0)
        return info | {"folder": str(folder.resolve())}

    def opd(self, student_init: str, teacher_init: str) -> dict[str, Any]:
        folder = self.run_dir / "student"
        cached = self._cached("opd", folder)
        if cached:
            return cached | {"folder": str(folder.resolve())}
        st = self.cfg["stages"]["opd"]
        t0 = time.time()
        self._seed("opd")
        module = OPDModule(self.cfg, student_init, teacher_init, plan=self.plan)
        data = _data(self.plan, self.cfg, "opd", self.plan.student)
        trainer = make_trainer(self.cfg, self.run_dir, "opd", st["steps"], st["val_every"])
        self.log(f"[opdlm] stage opd: loss {self.cfg['loss']['name']}, support {self.cfg['support']['name']}, "
                 f"{st['steps']} steps of {st['prompts_per_step']} prompts x {self.plan.sampler.n} rollouts")
        if st["steps"] > 0:
            trainer.fit(module, datamodule=data)
        metrics = _test(self.cfg, module, data)
        info = self._finish("opd", folder, module.student, self.plan.student.tokenizer, metrics, time.time() - t0)
        return info | {"folder": str(folder.resolve())}

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        L.seed_everything(cfg["run"]["seed"], workers=True, verbose=False)
        if cfg["trainer"]["threads"]:
            torch.set_num_threads(cfg["trainer"]["threads"])
        quiet_libraries()
        t0 = time.time()
        teacher = self.sft("teacher", cfg["teacher"]["path"])
        student = self.sft("student", cfg["student"]["path"])
        after = self.opd(student["folder"], teacher["folder"])
        results = {"seed": cfg["run"]["seed"], "teacher": teacher, "student_before": student,
                   "student_after": after, "seconds": round(time.time() - t0, 1)}
        table = results_table(results, cfg)
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        (self.run_dir / "results.md").write_text(table + "\n")
        self.log("\n" + table)
        self.log(f"\n[opdlm] run folder: {self.run_dir}  (student exported to {after['folder']})")
        return results


def results_table(results: dict[str, Any], cfg: dict[str, Any]) -> str:
    modes = [m for m in ("greedy", "sampled") if cfg["eval"][m]]
    head = "| model | " + " | ".join(f"test acc ({m})" for m in modes) + " | mean length | truncated |"
    sep = "|---" * (3 + len(modes)) + "|"
    rows = [head, sep]
    names = {"teacher": "teacher", "student_before": "student before OPD", "student_after": "student after OPD"}
    for key, label in names.items():
        t = results[key]["test"]
        m0 = modes[0] if modes else "greedy"
        accs = " | ".join(f"{100 * t.get(f'test/acc_{m}', float('nan')):.1f} %" for m in modes)
        rows.append(f"| {label} | {accs} | {t.get(f'test/len_{m0}', float('nan')):.1f} | "
                    f"{100 * t.get(f'test/trunc_{m0}', float('nan')):.1f} % |")
    n = cfg["eval"]["test_prompts"]
    rows.append(f"\nseed {results['seed']}, {n} test prompts, {results['seconds']} s")
    return "\n".join(rows)
