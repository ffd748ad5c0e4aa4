"""Lightning DataModule over a task plugin: tokenised reference solutions for the SFT stage,
prompts for the OPD stage, and held-out prompts for validation and test."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from opdlm.models import render_prompt
from opdlm.plugin_api import Task
from opdlm.registry import ConfigError
from opdlm.types import Example


class ListDataset(Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def sft_collate(tokenizer: Any, chat_template: bool, max_len: int | None = None):
    """Collate examples into right-padded input_ids/attention_mask/labels; prompt tokens and
    padding get label -100, the completion and its EOS are learned."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def collate(batch: list[Example]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for ex in batch:
            if ex.solution is None:
                raise ConfigError("task: the SFT stage needs reference solutions (set solution_field for jsonl)")
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


def list_collate(batch: list[Example]) -> list[Example]:
    return list(batch)


class TaskData(L.LightningDataModule):
    """Train batches (SFT token batches or OPD prompt batches) drawn with replacement-free
    reshuffles for ``steps`` optimizer steps; val/test prompt batches in order."""

    def __init__(self, task: Task, *, mode: str, batch_size: int, steps: int, seed: int,
                 eval_batch_size: int, val_prompts: int, test_prompts: int,
                 tokenizer: Any = None, chat_template: bool = False) -> None:
        super().__init__()
        self.task, self.mode, self.batch_size, self.steps, self.seed = task, mode, batch_size, steps, seed
        self.eval_batch_size, self.val_prompts, self.test_prompts = eval_batch_size, val_prompts, test_prompts
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def train_dataloader(self) -> DataLoader:
        ds = ListDataset(self.task.examples("train"))
        gen = torch.Generator().manual_seed(self.seed)
        sampler = RandomSampler(ds, replacement=False, num_samples=self.steps * self.batch_size, generator=gen)
        collate = sft_collate(self.tokenizer, self.chat_template) if self.mode == "sft" else list_collate
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, collate_fn=collate, drop_last=True)

    def _eval(self, split: str, n: int) -> DataLoader:
        items = self.task.examples(split)[:n] if n > 0 else self.task.examples(split)
        return DataLoader(ListDataset(items), batch_size=self.eval_batch_size, shuffle=False, collate_fn=list_collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval("val", self.val_prompts)

    def test_dataloader(self) -> DataLoader:
        return self._eval("test", self.test_prompts)
