"""Lightning DataModule over a task plugin: tokenised reference solutions for the SFT stage,
prompts for the OPD stage, and held-out prompts for validation and test.

Training batches are global: step s takes the s-th batch of a stream of reshuffles of the train
split (one permutation per pass, drawn from a generator seeded with the run's seed, cut into
batches; no item twice in one batch), whatever the number of processes. With W processes, rank r gets the r-th of W equal
consecutive slices of that global batch, so no item appears twice in one global step and the
ranks' slices, concatenated in rank order, are the batch one process would get. A stream resumed
at step s (after a kill) continues with batch s.

Evaluation batches are numbered; rank r takes batches r, r + W, ... (sharded, nothing repeated or
padded) and the metrics are summed over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch

from opdlm.errors import ConfigError
from opdlm.models import render_prompt
from opdlm.plugin_api import Task
from opdlm.types import Example


def sft_collate(tokenizer: Any, chat_template: bool, max_len: int | None = None):
    """Collate examples into right-padded input_ids/attention_mask/labels; prompt tokens and
    padding get label -100, the completion and its EOS are learned. A multi-turn example (an expert
    transcript in ``meta["turns"]``) is rendered as a whole conversation (opdlm.conversation) whose
    actions, each with its end of turn, are learned and whose observations are not."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    conversation = None

    def collate(batch: list[Example]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for ex in batch:
            if ex.solution is None:
                raise ConfigError("task: the SFT stage needs reference solutions (set solution_field for jsonl)")
            if ex.meta.get("turns"):
                nonlocal conversation
                if conversation is None:
                    from opdlm.conversation import Conversation
                    conversation = Conversation(tokenizer, chat_template)
                ids, mine = conversation.render(ex.prompt, ex.meta["turns"])
                lab = [i if m else -100 for i, m in zip(ids, mine)]
            else:
                p = render_prompt(tokenizer, ex.prompt, chat_template)
                c = tokenizer(ex.solution, add_special_tokens=False)["input_ids"] + [eos]
                ids = p + c
                lab = [-100] * len(p) + c
            if max_len is not None:
                ids, lab = ids[:max_len], lab[:max_len]
            seqs.append(ids)
            labels.append(lab)
        L_ = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), L_), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), L_), dtype=torch.long)
        lab_t = torch.full((len(seqs), L_), -100, dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
            lab_t[i, : len(lab)] = torch.tensor(lab)
        return {"input_ids": input_ids, "attention_mask": att, "labels": lab_t}

    return collate


class PromptBatch:
    """The examples of one prompt batch, in a box that Lightning's batch transfers and precision
    casts leave alone (they walk into lists and dataclasses)."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = list(examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __len__(self) -> int:
        return len(self.examples)


def list_collate(batch: list[Example]) -> PromptBatch:
    return PromptBatch(batch)


def global_batch(n_items: int, batch_size: int, step: int, seed: int, _cache: dict | None = None) -> list[int]:
    """Indices of global batch ``step``: passes over range(n_items), each a permutation drawn from
    a generator seeded with ``seed`` (one after another, as torch's RandomSampler draws them),
    each cut into n_items // batch_size batches (the remainder of a pass is left out, so no item
    appears twice in one batch)."""
    cache = _cache if _cache is not None else {}
    gen, perms = cache.setdefault("gen", torch.Generator().manual_seed(seed)), cache.setdefault("perms", [])
    per_pass = n_items // batch_size
    p, j = divmod(step, per_pass)
    while len(perms) <= p:
        perms.append(torch.randperm(n_items, generator=gen).tolist())
    return perms[p][j * batch_size : (j + 1) * batch_size]


class StepBatches:
    """The training batches of one rank for steps [start, steps): an iterable Lightning fetches
    from (not a torch DataLoader, so no sampler is replaced or padded). ``start`` is read when
    iteration begins (after a checkpoint was restored)."""

    def __init__(self, items: list[Any], *, batch_size: int, steps: int, seed: int, rank: int, world: int,
                 collate: Callable[[list[Any]], Any], start: Callable[[], int] = lambda: 0) -> None:
        if batch_size % world:
            raise ConfigError(f"batch of {batch_size} cannot be split evenly over {world} processes")
        if batch_size > len(items):
            raise ConfigError(f"batch of {batch_size} is larger than the {len(items)} training items")
        self.items, self.batch_size, self.steps, self.seed = items, batch_size, steps, seed
        self.rank, self.world, self.collate, self.start = rank, world, collate, start

    def __len__(self) -> int:
        return self.steps

    def rows(self, step: int) -> list[int]:
        """Item indices of this rank's slice of global batch ``step``."""
        idx = global_batch(len(self.items), self.batch_size, step, self.seed, self._cache)
        per = self.batch_size // self.world
        return idx[self.rank * per : (self.rank + 1) * per]

    def __iter__(self) -> Iterator[Any]:
        self._cache: dict = {}
        for step in range(self.start(), self.steps):
            yield self.collate([self.items[i] for i in self.rows(step)])


class EvalBatches:
    """Numbered evaluation batches of one rank: (global batch index, examples) for batch indices
    rank, rank + world, ..."""

    def __init__(self, items: list[Example], batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.items, self.batch_size, self.rank, self.world = items, batch_size, rank, world

    def __len__(self) -> int:
        n = -(-len(self.items) // self.batch_size)
        return len(range(self.rank, n, self.world))

    def __iter__(self) -> Iterator[tuple[int, list[Example]]]:
        n = -(-len(self.items) // self.batch_size)
        for b in range(self.rank, n, self.world):
            yield b, self.items[b * self.batch_size : (b + 1) * self.batch_size]


def eval_items(task: Task, split: str, n: int) -> list[Example]:
    items = task.examples(split)
    return items[:n] if n > 0 else items


class TaskData(L.LightningDataModule):
    """Train batches (SFT token batches or OPD prompt batches, global ``batch_size`` split over
    the processes) for ``steps`` steps. Validation and test batches are opdlm.evaluation's own."""

    def __init__(self, task: Task, *, mode: str, batch_size: int, steps: int, seed: int,
                 tokenizer: Any = None, chat_template: bool = False,
                 start: Callable[[], int] = lambda: 0, schedule: Callable[[int], str] | None = None) -> None:
        super().__init__()
        self.task, self.mode, self.batch_size, self.steps, self.seed = task, mode, batch_size, steps, seed
        self.tokenizer, self.chat_template, self.start = tokenizer, chat_template, start
        self.schedule = schedule  # multi-task OPD: the task of each batch (opdlm.multitask.TaskSchedule)

    def _ranks(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> Any:
        rank, world = self._ranks()
        if self.mode == "opd" and self.schedule is not None:
            from opdlm.multitask import MultiTaskBatches, label_of
            items: dict[str, list[Example]] = {}
            for ex in self.task.examples("train"):
                items.setdefault(label_of(ex), []).append(ex)
            return MultiTaskBatches(items, self.schedule, batch_size=self.batch_size, steps=self.steps, seed=self.seed,
                                    rank=rank, world=world, collate=list_collate, start=self.start)
        collate = sft_collate(self.tokenizer, self.chat_template) if self.mode == "sft" else list_collate
        return StepBatches(self.task.examples("train"), batch_size=self.batch_size, steps=self.steps,
                           seed=self.seed, rank=rank, world=world, collate=collate, start=self.start)

