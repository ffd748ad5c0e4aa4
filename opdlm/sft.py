"""Supervised cold start (SFT) and the evaluation both stages share: generate answers for held-out
prompts with the configured sampler (greedy and/or sampled) and score them with the task's
verifier. Also the optimizer and schedule every stage uses, and model loading."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from opdlm.build import Plan
from opdlm.dist import step_seed
from opdlm.models import render_prompt
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


#: numbers that keep the seeds of the evaluation splits apart from the training stages' seeds
SPLIT_SEED = {"val": 101, "test": 102}


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer: Any, plan: Plan, chat_template: bool, batch: list[Example],
                   modes: list[str], seed: int) -> dict[str, dict[str, Tensor]]:
    """Per mode (greedy / sampled), per example: correct (0/1), response length and truncation.
    The sampled mode draws from a generator seeded with ``seed`` alone, so a batch's result does
    not depend on which process evaluates it or on what ran before."""
    prompts = [render_prompt(tokenizer, ex.prompt, chat_template) for ex in batch]
    out = {}
    for i, mode in enumerate(modes):
        torch.manual_seed(step_seed(seed, i))
        ro = plan.sampler.sample(model, tokenizer, prompts, batch, greedy=mode == "greedy", n=1)
        correct = torch.tensor([float(plan.task.verify(t, ex)) for t, ex in zip(ro.texts, ro.examples)])
        out[mode] = {"acc": correct, "len": ro.lengths.float().cpu(), "trunc": ro.truncated.float().cpu()}
    return out


def evaluate(model: nn.Module, tokenizer: Any, plan: Plan, config: dict[str, Any], chat_template: bool,
             split: str = "test", progress: bool = False) -> dict[str, float]:
    """Accuracy, mean response length and truncated fraction of ``model`` on the first
    ``eval.<split>_prompts`` prompts of a split, per evaluation mode. Sharded over the processes of
    a multi-device run (rank r evaluates batches r, r + W, ...) and summed over them: every process
    gets the same numbers, and they do not depend on the number of processes."""
    from opdlm import dist
    from opdlm.data import EvalBatches, eval_items

    ev = config["eval"]
    modes = eval_modes(config)
    items = eval_items(plan.task, split, ev[f"{split}_prompts"])
    batches = EvalBatches(items, ev["batch_size"], dist.rank(), dist.world())
    device = next(model.parameters()).device
    sums = torch.zeros(len(modes), 4, dtype=torch.float64)  # correct, length, truncated, count
    was_training = model.training
    model.eval()
    bar = None
    if progress and dist.is_main():
        from tqdm.auto import tqdm
        bar = tqdm(total=len(batches), desc=f"{split} evaluation", leave=False, dynamic_ncols=True)
    for b, batch in batches:
        res = generate_batch(model, tokenizer, plan, chat_template, batch, modes, step_seed(config["run"]["seed"], SPLIT_SEED[split], b))
        for i, mode in enumerate(modes):
            r = res[mode]
            sums[i] += torch.tensor([r["acc"].sum(), r["len"].sum(), r["trunc"].sum(), len(batch)], dtype=torch.float64)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.train(was_training)
    if dist.world() > 1:
        backend = torch.distributed.get_backend()
        sums = dist.all_sum(sums.to(device if backend == "nccl" else "cpu")).cpu()
    out = {}
    for i, mode in enumerate(modes):
        n = max(sums[i, 3].item(), 1.0)
        out.update({f"{split}/acc_{mode}": sums[i, 0].item() / n, f"{split}/len_{mode}": sums[i, 1].item() / n,
                    f"{split}/trunc_{mode}": sums[i, 2].item() / n})
    return out


class GenerationEval(L.LightningModule):
    """Validation during training: every ``val_every`` batches, ``evaluate`` on the validation
    split (sharded over the processes; every rank gets the same global numbers), logged as val/*."""

    MODES = ("greedy", "sampled")

    def setup_eval(self, plan: Plan, modes: list[str], chat_template: bool, val_every: int = 0) -> None:
        self.plan = plan
        self.eval_modes = modes
        self.chat_template = chat_template
        self.val_every = val_every
        self.batches_done = 0  # kept in checkpoints: a resumed stage continues with the next batch
        self.fingerprint = ""  # the stage's fingerprint (kept in checkpoints; set by the runner)

    @property
    def eval_model(self) -> nn.Module:
        raise NotImplementedError

    @property
    def eval_tokenizer(self) -> Any:
        raise NotImplementedError

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, (list, tuple)):  # prompt batches: Examples stay on the host
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["opdlm"] = {"fingerprint": self.fingerprint, "batches_done": self.batches_done}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.batches_done = int(checkpoint.get("opdlm", {}).get("batches_done", 0))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.val_every or self.batches_done % self.val_every:
            return
        config = self.hparams["config"]
        wrapped = self.trainer.strategy.model
        gather = getattr(type(wrapped), "summon_full_params", None)  # FSDP: the whole model on every rank
        # validation draws from its own seeds and leaves the training's random state as it was
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if gather is not None:
                with gather(wrapped, writeback=False, recurse=True):
                    metrics = evaluate(self.eval_model, self.eval_tokenizer, self.plan, config, self.chat_template, "val")
            else:
                metrics = evaluate(self.eval_model, self.eval_tokenizer, self.plan, config, self.chat_template, "val")
        for k, v in metrics.items():
            self.log(k, v, on_step=True, on_epoch=False, prog_bar=k.startswith("val/acc"))


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
        self.setup_eval(plan, eval_modes(config), self.spec.node["chat_template"], self.stage["val_every"])

    @property
    def eval_model(self) -> nn.Module:
        return self.model

    @property
    def eval_tokenizer(self) -> Any:
        return self.spec.tokenizer

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False)
        n = (batch["labels"][:, 1:] != -100).sum()
        self.log("train/loss", out.loss, prog_bar=True, batch_size=int(n))
        self.batches_done += 1
        world = self.trainer.world_size
        if world == 1:
            return out.loss
        # the token mean over every process's tokens (data-parallel averaging then gives it exactly)
        from opdlm.dist import all_sum
        total = all_sum(n.float()).clamp_min(1.0)
        return out.loss * n / total * world

    def configure_optimizers(self) -> Any:
        return make_optimizer(self, self.model.parameters(), self.stage)


def load_or_build(spec: Any, init: str | None, seed: int) -> nn.Module:
    """The model of a stage: loaded from the previous stage's folder, or built from its node."""
    if init:
        from opdlm.models import load_weights
        key = f"{spec.key}.path" if spec.path and str(init) == str(spec.path) else f"stage folder {init}"
        model = load_weights(init, key, getattr(torch, spec.node["dtype"]))
        model.generation_config.pad_token_id = spec.tokenizer.pad_token_id
        model.generation_config.eos_token_id = spec.tokenizer.eos_token_id
    else:
        model = spec.build(seed)
    if spec.node["gradient_checkpointing"]:  # recompute each layer's activations in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def eval_modes(config: dict[str, Any]) -> list[str]:
    return [m for m in GenerationEval.MODES if config["eval"][m]]
