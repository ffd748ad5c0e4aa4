"""Diagnostics of rollouts that the paper plots but gives no formula for."""

from __future__ import annotations

import torch
from torch import Tensor


def tail_repeats(tokens: list[int], max_n: int = 4, repeats: int = 3) -> bool:
    """True if the sequence ends with some n-gram (n <= max_n) written ``repeats`` times in a row,
    e.g. "Wait, Wait, Wait," - the repetition loop of a drifted student."""
    for n in range(1, max_n + 1):
        span = n * repeats
        if len(tokens) < span:
            break
        tail = tokens[-span:]
        if all(tail[i] == tail[i % n] for i in range(span)):
            return True
    return False


def repetition_frac(targets: Tensor, lengths: Tensor, eos_id: int | None, max_n: int = 4, repeats: int = 3) -> Tensor:
    """Share of responses (EOS excluded) whose tail repeats an n-gram ``repeats`` times."""
    hits = 0
    for row, n in zip(targets.tolist(), lengths.tolist()):
        toks = row[:n]
        if toks and eos_id is not None and toks[-1] == eos_id:
            toks = toks[:-1]
        hits += tail_repeats(toks, max_n, repeats)
    return torch.tensor(hits / max(1, len(lengths)))
