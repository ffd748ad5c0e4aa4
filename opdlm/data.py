"""Lightning DataModule over a run's tasks: tokenised reference solutions for the SFT stages (a
teacher's own task, or every task for the student's cold start), prompt batches for the OPD stage
(each of one task, in the order of ``stages.opd.task_schedule``), and held-out prompts for
validation and test.

Training batches are global: step s takes the s-th batch of a stream of reshuffles of the train
split (one permutation per pass, drawn from a generator seeded with the run's seed, cut into
batches; no item twice in one batch), whatever the number of processes. With W processes, rank r gets the r-th of W equal
consecutive slices of that global batch, so no item appears twice in one global step and the
ranks' slices, concatenated in rank order, are the batch one process would get. A stream resumed
at step s (after a kill) continues with batch s.

OPD batches follow a schedule of tasks (``TaskSchedule``): the k-th batch of task j is the k-th
batch of that task's own stream, seeded with the run's seed + 7919·j (the run's seed for the first
or only task). Evaluation batches are numbered; rank r takes batches r, r + W, ... (sharded, nothing repeated or
padded) and the metrics are summed over ranks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch

from opdlm.conversation import Conversation
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
    """The examples of one prompt batch and the label of their task, in a box that Lightning's batch
    transfers and precision casts leave alone (they walk into lists and dataclasses)."""

    def __init__(self, examples: list[Example], label: str = "") -> None:
        self.examples = list(examples)
        self.label = label

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __len__(self) -> int:
        return len(self.examples)


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


class TaskSchedule:
    """Which task rollout batch s holds: ``alternate`` (in order, ``weight`` consecutive batches
    each) or ``mixed`` (drawn in proportion to ``weight`` from ``seed``); the same on every process
    and whatever the order of asking."""

    def __init__(self, labels: list[str], weights: list[float], kind: str, seed: int) -> None:
        self.labels, self.weights, self.kind = labels, weights, kind
        self.cycle = [lab for lab, w in zip(labels, weights) for _ in range(int(w))] if kind == "alternate" else []
        self._drawn: list[str] = []
        self._rng = random.Random(seed)

    def __call__(self, step: int) -> str:
        if self.kind == "alternate":
            return self.cycle[step % len(self.cycle)]
        while len(self._drawn) <= step:
            self._drawn.append(self._rng.choices(self.labels, weights=self.weights)[0])
        return self._drawn[step]


class ScheduledBatches:
    """The OPD prompt batches of one rank for steps [start, steps): batch s holds the prompts of task
    schedule(s), the k-th batch of that task being the k-th of its own stream of reshuffles
    (global_batch, seeded with seed + 7919·j for the j-th task), cut into the processes' slices as
    StepBatches are. Each batch is a PromptBatch that carries its task's label."""

    def __init__(self, items: Mapping[str, Sequence[Example]], schedule: Callable[[int], str], *, batch_size: int,
                 steps: int, seed: int, rank: int, world: int, start: Callable[[], int] = lambda: 0) -> None:
        for label, xs in items.items():
            if batch_size > len(xs):
                raise ConfigError(f"stages.opd.prompts_per_step: a batch of {batch_size} is larger than task "
                                  f"{label!r}'s {len(xs)} training items")
        self.items, self.schedule, self.batch_size, self.steps = items, schedule, batch_size, steps
        self.seed, self.rank, self.world, self.start = seed, rank, world, start

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[PromptBatch]:
        caches: dict[str, dict] = {label: {} for label in self.items}
        counts = {label: 0 for label in self.items}
        seeds = {label: self.seed + 7919 * j for j, label in enumerate(self.items)}  # a stream per task
        for s in range(self.start()):
            counts[self.schedule(s)] += 1
        per = self.batch_size // self.world
        for step in range(self.start(), self.steps):
            label = self.schedule(step)
            xs = self.items[label]
            idx = global_batch(len(xs), self.batch_size, counts[label], seeds[label], caches[label])
            counts[label] += 1
            yield PromptBatch([xs[i] for i in idx[self.rank * per:(self.rank + 1) * per]], label)


class TaskData(L.LightningDataModule):
    """The train batches of one stage from ``sets`` (task label -> its train examples) for ``steps``
    steps of ``batch_size`` items over all processes: SFT token batches over every set's examples
    (one set for a teacher, every task's for the student), or OPD prompt batches, each of one task,
    in the order of ``schedule`` (default: the tasks in turn). Validation and test batches are
    opdlm.evaluation's own."""

    def __init__(self, sets: Mapping[str, Sequence[Example]], *, mode: str, batch_size: int, steps: int, seed: int,
                 tokenizer: Any = None, chat_template: bool = False, start: Callable[[], int] = lambda: 0,
                 schedule: Callable[[int], str] | None = None) -> None:
        super().__init__()
        self.sets, self.mode, self.batch_size, self.steps, self.seed = dict(sets), mode, batch_size, steps, seed
        self.tokenizer, self.chat_template, self.start = tokenizer, chat_template, start
        self.schedule = schedule or TaskSchedule(list(self.sets), [1.0] * len(self.sets), "alternate", seed)

    def _ranks(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> Any:
        rank, world = self._ranks()
        if self.mode == "opd":
            return ScheduledBatches(self.sets, self.schedule, batch_size=self.batch_size, steps=self.steps,
                                    seed=self.seed, rank=rank, world=world, start=self.start)
        items = [ex for xs in self.sets.values() for ex in xs]
        return StepBatches(items, batch_size=self.batch_size, steps=self.steps, seed=self.seed, rank=rank, world=world,
                           collate=sft_collate(self.tokenizer, self.chat_template), start=self.start)

