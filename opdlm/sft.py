"""Supervised cold start (SFT) and the evaluation both stages share: generate answers for held-out
prompts with the configured sampler (greedy and/or sampled) and score them with the task's
verifier. Also the optimizer and schedule every stage uses, and model loading."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from opdlm.build import Plan
from opdlm.models import render_prompt
from opdlm.plugin_api import Task
from opdlm.types import Example


def lr_lambda(warmup: int, total: int, schedule: str):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine" and total > warmup:
            frac = (step - warmup) / max(1, total - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return 1.0
    return f


def make_optimizer(module: L.LightningModule, params: Any, st: dict[str, Any]) -> Any:
    opt = torch.optim.AdamW(params, lr=st["lr"], weight_decay=st["weight_decay"], betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(st["warmup_steps"], st["steps"], st["schedule"]))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class GenerationEval(L.LightningModule):
    """Validation/test: generate responses for prompt batches and log verifier accuracy."""

    MODES = ("greedy", "sampled")

    def setup_eval(self, plan: Plan, modes: list[str], chat_template: bool) -> None:
        self.plan = plan
        self.eval_modes = modes
        self.chat_template = chat_template
        self.metrics = nn.ModuleDict({
            f"{split}_{what}_{mode}": MeanMetric()
            for split in ("val", "test") for mode in modes for what in ("acc", "len", "trunc")
        })

    @property
    def eval_model(self) -> nn.Module:
        raise NotImplementedError

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, list):  # prompt batches: Examples stay on the host
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    @property
    def eval_tokenizer(self) -> Any:
        raise NotImplementedError

    def _generate_eval(self, batch: list[Example], split: str) -> None:
        task: Task = self.plan.task
        tok = self.eval_tokenizer
        prompts = [render_prompt(tok, ex.prompt, self.chat_template) for ex in batch]
        for mode in self.eval_modes:
            ro = self.plan.sampler.sample(self.eval_model, tok, prompts, batch, greedy=mode == "greedy", n=1)
            correct = torch.tensor([float(task.verify(t, ex)) for t, ex in zip(ro.texts, ro.examples)])
            for what, val in (("acc", correct), ("len", ro.lengths.float().cpu()), ("trunc", ro.truncated.float().cpu())):
                m = self.metrics[f"{split}_{what}_{mode}"]
                m.update(val.to(self.device))
                self.log(f"{split}/{what}_{mode}", m, on_step=False, on_epoch=True, batch_size=len(batch),
                         prog_bar=(what == "acc" and split == "val"))

    def validation_step(self, batch: list[Example], batch_idx: int) -> None:
        self._generate_eval(batch, "val")

    def test_step(self, batch: list[Example], batch_idx: int) -> None:
        self._generate_eval(batch, "test")


class SFTModule(GenerationEval):
    """Cross-entropy on reference solutions (prompt tokens are not learned)."""

    def __init__(self, config: dict[str, Any], role: str, init: str | None = None, *,
                 plan: Plan | None = None, model: nn.Module | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config, "role": role, "init": init})
        if plan is None:
            from opdlm.build import build_plan
            plan = build_plan(config)
        self.spec = plan.teacher if role == "teacher" else plan.student
        self.model = model if model is not None else load_or_build(self.spec, init, config["run"]["seed"])
        self.stage = config["stages"][f"{role}_sft"]
        self.setup_eval(plan, eval_modes(config), self.spec.node["chat_template"])

    @property
    def eval_model(self) -> nn.Module:
        return self.model

    @property
    def eval_tokenizer(self) -> Any:
        return self.spec.tokenizer

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False)
        n = (batch["labels"] != -100).sum()
        self.log("train/loss", out.loss, prog_bar=True, batch_size=int(n))
        return out.loss

    def configure_optimizers(self) -> Any:
        return make_optimizer(self, self.model.parameters(), self.stage)


def load_or_build(spec: Any, init: str | None, seed: int) -> nn.Module:
    if init:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(init, local_files_only=True,
                                                     dtype=getattr(torch, spec.node["dtype"]))
        model.generation_config.pad_token_id = spec.tokenizer.pad_token_id
        model.generation_config.eos_token_id = spec.tokenizer.eos_token_id
        return model
    return spec.build(seed)


def eval_modes(config: dict[str, Any]) -> list[str]:
    return [m for m in GenerationEval.MODES if config["eval"][m]]
