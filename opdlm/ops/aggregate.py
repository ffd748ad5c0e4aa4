"""How per-token losses become the loss of one optimizer step (``stages.opd.loss_aggregation``),
exact across micro-batches and data-parallel ranks: every count is taken over the whole
mini-batch on every rank before any backward pass.

- token_mean (the LSM paper's Eq. 8, the default): Σ_{i,t} m ℓ / Σ_{i,t} m.
- seq_mean_token_mean: the mean over sequences of each sequence's token mean,
  (1/N) Σ_i (Σ_t m ℓ / Σ_t m) (what the official code effectively does with one sequence per
  micro-batch).
- seq_mean_token_sum: (1/N) Σ_i Σ_t m ℓ.
- seq_mean_token_sum_norm: (1/(N·L)) Σ_i Σ_t m ℓ with a fixed length L (``loss_norm_length``).
N counts the sequences with at least one token in the loss (m: the loss mask)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def aggregation(mask: Tensor, mode: str, *, norm_length: int = 1,
                all_sum: Callable[[Tensor], Tensor] = lambda x: x) -> tuple[Tensor, Tensor]:
    """(weights [rows, T], denominator) such that the step's loss is Σ weights·ℓ / denominator over
    the mini-batch's rows of every rank; ``all_sum`` sums a count over the ranks. token_mean keeps
    weights = mask, so its loss is computed exactly as Σ m ℓ / Σ m."""
    m = mask.to(torch.float64)
    if mode == "token_mean":
        return mask, all_sum(m.sum()).clamp_min(1.0)
    per_seq = m.sum(-1, keepdim=True)
    n_seq = all_sum((per_seq > 0).to(torch.float64).sum()).clamp_min(1.0)
    if mode == "seq_mean_token_mean":
        return m / per_seq.clamp_min(1.0), n_seq
    if mode == "seq_mean_token_sum":
        return mask, n_seq
    if mode == "seq_mean_token_sum_norm":
        return mask, n_seq * float(norm_length)
    raise ValueError(f"unknown loss aggregation {mode!r}; choices: {', '.join(AGGREGATIONS)}")
