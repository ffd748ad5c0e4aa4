"""Supervised cold start (SFT): cross-entropy on the task's reference solutions. Its optimizer steps
are taken by hand, as the OPD stage's are, so that both go through the same guard
(opdlm.guard.guarded_step: clip, check for non-finite numbers, step)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from opdlm.builder import BuiltRun, build_run
from opdlm.dist import all_sum
from opdlm.evaluation import GenerationEval, eval_modes
from opdlm.guard import StepGuard, guarded_step
from opdlm.models import load_or_build
from opdlm.optim import make_optimizer


class SFTModule(GenerationEval):
    """Cross-entropy on reference solutions (prompt tokens are not learned). ``role`` teacher: the
    teacher of ``task`` (the run's only task by default) on that task's solutions, with its own
    stages.teacher_sft; student: the student on every task's solutions."""

    def __init__(self, config: dict[str, Any], role: str, init: str | None = None, *,
                 built: BuiltRun | None = None, model: nn.Module | None = None, task: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config, "role": role, "init": init, "task": task})
        run = built if built is not None else build_run(config)
        own = run.tasks[task] if task is not None else run.only if role == "teacher" else None
        self.spec = own.teacher if own is not None else run.student
        self.model = model if model is not None else load_or_build(self.spec, init, config["run"]["seed"])
        self.stage = (own.cfg if own is not None else config)["stages"][f"{role}_sft"]
        self.guard = StepGuard(f"{role}_sft", self.stage, key=f"{own.key}teacher_sft" if own is not None and own.key else "",
                               label=own.label if own is not None and run.several else "")
        self.automatic_optimization = False
        self.setup_eval(run, eval_modes(config), self.spec.node["chat_template"], self.stage["val_every"],
                        task=own.label if own is not None else None)

    @property
    def eval_model(self) -> nn.Module:
        return self.model

    @property
    def eval_tokenizer(self) -> Any:
        return self.spec.tokenizer

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False)
        n = (batch["labels"][:, 1:] != -100).sum()
        self.log("train/loss", out.loss, prog_bar=True, batch_size=int(n))
        world = self.trainer.world_size
        loss = out.loss
        if world > 1:  # the token mean over every process's tokens (data-parallel averaging then gives it exactly)
            loss = out.loss * n / all_sum(n.float()).clamp_min(1.0) * world
        self.manual_backward(loss)
        guarded_step(self, self.optimizers(), self.lr_schedulers(), self.model.parameters(), self.stage["max_grad_norm"],
                     out.loss.detach(), "the loss (cross-entropy)")
        if self.guard.mode == "skip":
            self.log("train/skipped_steps", torch.tensor(float(self.guard.skipped)), batch_size=int(n))
        self.batches_done += 1

    def configure_optimizers(self) -> Any:
        return make_optimizer(self, self.model.parameters(), self.stage)
