"""Evaluation both kinds of stage share: generate answers for held-out prompts with the configured
sampler (greedy and/or sampled) and score them with the task's verifier, sharded over the
processes of a run; and the LightningModule base that validates during training."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from opdlm.build import BuiltRun
from opdlm.dist import step_seed
from opdlm.models import render_prompt
from opdlm.types import Example

#: numbers that keep the seeds of the evaluation splits apart from the training stages' seeds
SPLIT_SEED = {"val": 101, "test": 102}


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer: Any, built: BuiltRun, chat_template: bool, batch: list[Example],
                   modes: list[str], seed: int) -> dict[str, dict[str, Tensor]]:
    """Per mode (greedy / sampled), per example: correct (0/1), response length and truncation.
    The sampled mode draws from a generator seeded with ``seed`` alone, so a batch's result does
    not depend on which process evaluates it or on what ran before."""
    prompts = [render_prompt(tokenizer, ex.prompt, chat_template) for ex in batch]
    out = {}
    for i, mode in enumerate(modes):
        torch.manual_seed(step_seed(seed, i))
        ro = built.sampler.sample(model, tokenizer, prompts, batch, greedy=mode == "greedy", n=1)
        correct = torch.tensor([float(built.task.verify(t, ex)) for t, ex in zip(ro.texts, ro.examples)])
        out[mode] = {"acc": correct, "len": ro.lengths.float().cpu(), "trunc": ro.truncated.float().cpu()}
    return out


def evaluate(model: nn.Module, tokenizer: Any, built: BuiltRun, config: dict[str, Any], chat_template: bool,
             split: str = "test", progress: bool = False) -> dict[str, float]:
    """Accuracy, mean response length and truncated fraction of ``model`` on the first
    ``eval.<split>_prompts`` prompts of a split, per evaluation mode. Sharded over the processes of
    a multi-device run (rank r evaluates batches r, r + W, ...) and summed over them: every process
    gets the same numbers, and they do not depend on the number of processes."""
    from opdlm import dist
    from opdlm.data import EvalBatches, eval_items

    ev = config["eval"]
    modes = eval_modes(config)
    items = eval_items(built.task, split, ev[f"{split}_prompts"])
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
        res = generate_batch(model, tokenizer, built, chat_template, batch, modes, step_seed(config["run"]["seed"], SPLIT_SEED[split], b))
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

    def setup_eval(self, built: BuiltRun, modes: list[str], chat_template: bool, val_every: int = 0) -> None:
        self.built = built
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
                    metrics = evaluate(self.eval_model, self.eval_tokenizer, self.built, config, self.chat_template, "val")
            else:
                metrics = evaluate(self.eval_model, self.eval_tokenizer, self.built, config, self.chat_template, "val")
        for k, v in metrics.items():
            self.log(k, v, on_step=True, on_epoch=False, prog_bar=k.startswith("val/acc"))


def eval_modes(config: dict[str, Any]) -> list[str]:
    return [m for m in GenerationEval.MODES if config["eval"][m]]
