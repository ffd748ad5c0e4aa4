"""Evaluation both kinds of stage share: generate answers for held-out prompts with the configured
sampler (greedy and/or sampled) and score them with the task's verifier, sharded over the
processes of a run; and the LightningModule base that validates during training."""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from tqdm.auto import tqdm

from opdlm import dist
from opdlm.builder import BuiltRun, TaskRun
from opdlm.data import EvalBatches, eval_items
from opdlm.dist import step_seed
from opdlm.guard import check_checkpoint
from opdlm.metrics import majority_correct, pass_at_k
from opdlm.models import render_prompt
from opdlm.optim import OPTIMIZER_KEYS, retune
from opdlm.plugin_api import Task
from opdlm.shard import gathered_copy, shard_fsdp2
from opdlm.types import Example

#: numbers that keep the seeds of the evaluation splits apart from the training stages' seeds
SPLIT_SEED = {"val": 101, "test": 102}


def sampler_kwargs(sampler: Any, chat_template: bool) -> dict[str, Any]:
    """What the engine passes a sampler beyond the base signature: a multi-turn sampler renders
    later user turns as the model's template does (Sampler.multi_turn)."""
    return {"chat_template": chat_template} if getattr(sampler, "multi_turn", False) else {}


def task_extracts(task: Any) -> bool:
    """Whether the task reads answers out of responses (Task.extract): maj@k and unparsed need it."""
    task = getattr(task, "inner", task)  # (examples left out as too long: the task itself decides)
    return type(task).extract is not Task.extract


def metric_names(modes: list[str], pass_k: list[int], extracts: bool, interactive: bool = False) -> list[str]:
    """The per-prompt metrics of an evaluation, in a fixed order (the same on every process).
    Interactive tasks: acc is the success rate (episodes won), plus mean turns and the share of
    actions the game did not accept."""
    names = []
    for mode in modes:
        names += [f"acc_{mode}", f"len_{mode}", f"trunc_{mode}"] + ([f"unparsed_{mode}"] if extracts else [])
        names += [f"turns_{mode}", f"invalid_{mode}"] if interactive else []
        if mode == "sampled":
            names += [f"pass@{k}" for k in pass_k] + ([f"maj@{k}" for k in pass_k] if extracts else [])
    return names


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer: Any, run: TaskRun, chat_template: bool, batch: list[Example],
                   modes: list[str], seed: int, samples: int = 1, pass_k: list[int] | tuple[int, ...] = ()
                   ) -> dict[str, Tensor]:
    """Per-prompt metrics [len(batch)] of one batch (metric_names): greedy decodes once; the sampled
    mode draws ``samples`` responses per prompt, acc_sampled is their mean correctness (avg@n),
    pass@k the unbiased estimate from them and maj@k the majority vote of the first k. Length,
    truncation and the unparsed share are means over a prompt's responses. The sampled mode draws
    from a generator seeded with ``seed`` alone, so a batch's result does not depend on which
    process evaluates it or on what ran before."""
    task = run.task
    extracts = task_extracts(task)
    prompts = [render_prompt(tokenizer, ex.prompt, chat_template) for ex in batch]
    out: dict[str, Tensor] = {}
    for i, mode in enumerate(modes):
        torch.manual_seed(step_seed(seed, i))
        n = 1 if mode == "greedy" else samples
        ro = run.sampler.sample(model, tokenizer, prompts, batch, greedy=mode == "greedy", n=n,
                                **sampler_kwargs(run.sampler, chat_template))
        if ro.outcomes is not None:  # played episodes: success is winning
            correct = [o.won for o in ro.outcomes]
        else:
            correct = [bool(task.verify(t, ex)) for t, ex in zip(ro.texts, ro.examples)]
        answers = [task.extract(t) for t in ro.texts] if extracts else [None] * len(correct)

        def per_prompt(values: list[float] | Tensor, n: int = n) -> Tensor:  # a prompt's mean over its responses
            return torch.as_tensor(values, dtype=torch.float64).reshape(len(batch), n).mean(-1)

        out[f"acc_{mode}"] = per_prompt([float(c) for c in correct])
        out[f"len_{mode}"] = per_prompt(ro.lengths.double().cpu())
        out[f"trunc_{mode}"] = per_prompt(ro.truncated.double().cpu())
        if extracts:
            out[f"unparsed_{mode}"] = per_prompt([float(a is None) for a in answers])
        if ro.outcomes is not None:
            out[f"turns_{mode}"] = per_prompt([float(o.turns) for o in ro.outcomes])
            out[f"invalid_{mode}"] = per_prompt([o.invalid / max(o.turns, 1) for o in ro.outcomes])
        if mode == "sampled":
            rows = [range(p * n, (p + 1) * n) for p in range(len(batch))]
            for k in pass_k:
                out[f"pass@{k}"] = torch.tensor([pass_at_k(n, sum(correct[r] for r in rs), k) for rs in rows],
                                                dtype=torch.float64)
                if extracts:
                    out[f"maj@{k}"] = torch.tensor(
                        [float(majority_correct([answers[r] for r in rs], [correct[r] for r in rs], k)) for rs in rows],
                        dtype=torch.float64)
    return out


def evaluate(model: nn.Module, tokenizer: Any, run: BuiltRun, config: dict[str, Any], chat_template: bool,
             split: str = "test", progress: bool = False, task: str | None = None) -> dict[str, float]:
    """The metrics of ``model`` on every task of the run (or on ``task`` alone, a teacher's own), each
    evaluated with its own sampler (evaluate_task). A run that lists its tasks (``tasks: [...]``)
    reports each as ``<split>/<label>/<metric>`` and their mean as ``<split>/<metric>``."""
    if task is not None:
        return evaluate_task(model, tokenizer, run.tasks[task], config, chat_template, split, progress)
    per = {label: evaluate_task(model, tokenizer, t, config, chat_template, split, progress)
           for label, t in run.tasks.items()}
    return merged_metrics(per, split) if run.several else per[next(iter(per))]


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


def evaluate_task(model: nn.Module, tokenizer: Any, run: TaskRun, config: dict[str, Any], chat_template: bool,
                  split: str = "test", progress: bool = False) -> dict[str, float]:
    """The metrics (metric_names) of ``model`` on the first ``eval.<split>_prompts`` prompts of one
    task's split, as ``<split>/<metric>``: means over prompts. When the split holds several named
    benchmarks (Example.meta["benchmark"]), each is also reported as ``<split>/<benchmark>/<metric>``
    and ``<split>/<metric>`` is their mean, as papers' tables average benchmarks. Sharded over the
    processes of a multi-device run (rank r evaluates batches r, r + W, ...) and summed over them:
    every process gets the same numbers, and they do not depend on the number of processes."""
    ev = config["eval"]
    modes = eval_modes(config)
    samples, pass_k = ev["samples"][split], list(ev["pass_k"][split])
    names = metric_names(modes, pass_k, task_extracts(run.task), bool(getattr(run.task, "interactive", False)))
    items = eval_items(run.task, split, ev[f"{split}_prompts"])
    groups = sorted({ex.meta.get("benchmark", "") for ex in items})  # the same on every process
    batches = EvalBatches(items, ev["batch_size"], dist.rank(), dist.world())
    device = next(model.parameters()).device
    sums = torch.zeros(len(groups), len(names) + 1, dtype=torch.float64)  # per group: metric sums, prompts
    was_training = model.training
    model.eval()
    run.sampler.start(model, tokenizer)  # (every process, before the batches each one evaluates on its own)
    bar = None
    if progress and dist.is_main():
        bar = tqdm(total=len(batches), desc=f"{split} evaluation", leave=False, dynamic_ncols=True)
    for b, batch in batches:
        res = generate_batch(model, tokenizer, run, chat_template, batch, modes,
                             step_seed(config["run"]["seed"], SPLIT_SEED[split], b), samples, pass_k)
        for p, ex in enumerate(batch):
            g = groups.index(ex.meta.get("benchmark", ""))
            sums[g, :-1] += torch.stack([res[m][p] for m in names])
            sums[g, -1] += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.train(was_training)
    if dist.world() > 1:
        backend = torch.distributed.get_backend()
        sums = dist.all_sum(sums.to(device if backend == "nccl" else "cpu")).cpu()
    means = sums[:, :-1] / sums[:, -1:].clamp_min(1.0)
    out = {f"{split}/{m}": means[:, j].mean().item() for j, m in enumerate(names)}  # mean over benchmarks
    if groups != [""]:
        for g, name in enumerate(groups):
            out.update({f"{split}/{name}/{m}": means[g, j].item() for j, m in enumerate(names)})
    return out


class GenerationEval(L.LightningModule):
    """Validation during training: every ``val_every`` batches, ``evaluate`` on the validation
    split (sharded over the processes; every rank gets the same global numbers), logged as val/*."""

    MODES = ("greedy", "sampled")

    def setup_eval(self, run: BuiltRun, modes: list[str], chat_template: bool, val_every: int = 0,
                   task: str | None = None) -> None:
        """``task``: the one task validated (a teacher's own), else every task of ``run``."""
        self.run, self.eval_task = run, task
        self.eval_modes = modes
        self.chat_template = chat_template
        self.val_every = val_every
        self.batches_done = 0  # kept in checkpoints: a resumed stage continues with the next batch
        self.fingerprint = ""  # the stage's fingerprint (kept in checkpoints; set by the runner)

    @property
    def eval_model(self) -> nn.Module:
        raise NotImplementedError

    def configure_model(self) -> None:
        """Under trainer.strategy=model_parallel: the trained model (``eval_model``) sharded with FSDP2
        over the data-parallel processes (opdlm.shard). Nothing under other strategies."""
        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            shard_fsdp2(self.eval_model, self.device_mesh["data_parallel"])

    @property
    def eval_tokenizer(self) -> Any:
        raise NotImplementedError

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, (list, tuple)):  # prompt batches: Examples stay on the host
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        guard = getattr(self, "guard", None)
        if guard is not None:  # a checkpoint never holds non-finite weights (opdlm.guard)
            check_checkpoint(checkpoint, guard.stage, self.device)
        checkpoint["opdlm"] = {"fingerprint": self.fingerprint, "frame": getattr(self, "frame", ""),
                               "batches_done": self.batches_done,
                               **({"nonfinite": guard.state(),
                                   "optimizer": {k: self.stage[k] for k in OPTIMIZER_KEYS}} if guard is not None else {})}
        if getattr(self, "saving_mid_step", False):  # a stop's checkpoint (opdlm.guard), written inside a step:
            # Lightning resumes such a checkpoint with its logging step one ahead (it counts the batch as
            # stepped, as if the checkpoint were written at the batch's end); this batch was not stepped
            checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("opdlm", {})
        self.batches_done = int(meta.get("batches_done", 0))
        if getattr(self, "guard", None) is not None:
            self.guard.load(meta.get("nonfinite", {}))
            retune(checkpoint, self.stage)  # the stage's optimizer keys as configured now (opdlm.optim.retune)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.val_every or self.batches_done % self.val_every:
            return
        config = self.hparams["config"]
        wrapped = self.trainer.strategy.model
        summon = getattr(type(wrapped), "summon_full_params", None)  # FSDP1 (strategy fsdp): the whole model on every rank
        # FSDP2 (strategy model_parallel): a gathered copy on every rank (collective); each then evaluates its own batches
        with contextlib.ExitStack() as stack:
            if summon is not None:
                stack.enter_context(summon(wrapped, writeback=False, recurse=True))
            model = self.eval_model if summon is not None else gathered_copy(self.eval_model)
            # validation draws from its own seeds and leaves the training's random state as it was
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                metrics = evaluate(model, self.eval_tokenizer, self.run, config, self.chat_template, "val",
                                   task=self.eval_task)
            del model
        # to the log files once, at this step (self.log would repeat the value at every later logging
        # step); to the progress bar through self.log
        for lg in self.loggers:
            lg.log_metrics(metrics, step=self.trainer.global_step)
        for k, v in metrics.items():
            if k.startswith("val/acc") and k.count("/") == 1:
                self.log(k, v, on_step=True, on_epoch=False, prog_bar=True, logger=False)


def eval_modes(config: dict[str, Any]) -> list[str]:
    return [m for m in GenerationEval.MODES if config["eval"][m]]
