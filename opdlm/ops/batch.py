"""Batch plumbing of the OPD stage: row slices of batch-first dataclasses, mini/micro-batch
bounds, the full-vocabulary support, and the cross-tokenizer alignment diagnostics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from opdlm.types import Rollout, Support, TeacherView


def take(x: Any, rows: slice) -> Any:
    """Rows of a batch-first dataclass (tensors and lists sliced, scalars kept)."""
    if isinstance(x, Tensor):
        return x[rows]
    if isinstance(x, list):
        return x[rows]
    if hasattr(x, "__dataclass_fields__"):
        return type(x)(**{k: take(getattr(x, k), rows) for k in x.__dataclass_fields__})
    return x


@torch.no_grad()
def alignment_stats(rollout: Rollout, view: TeacherView) -> dict[str, Tensor]:
    """Cross-tokenizer alignment diagnostics (empty with one tokenizer): fractions of response
    tokens in one-to-one chunks, eligible for token-level (top-K) comparison, not aligned, in
    mismatched chunks, past a broken UTF-8 prefix, and student tokens per chunk."""
    if view.chunk is None:
        return {}
    resp = rollout.response_mask
    n = resp.sum().float().clamp_min(1.0)
    frac = lambda x: (x & resp).sum().float() / n  # noqa: E731
    out = {
        "xtok/one_to_one_frac": frac(view.one_to_one if view.one_to_one is not None else view.aligned),
        "xtok/topk_eligible_frac": frac(view.positions("token")),
        "xtok/unaligned_frac": frac(~view.aligned),
        "xtok/mean_chunk_len": (view.aligned & resp).sum().float() / view.positions("start").sum().float().clamp_min(1.0),
    }
    if view.teacher_chunk is not None:  # teacher tokens per chunk (the other side's granularity)
        out["xtok/teacher_tokens_per_chunk"] = ((view.teacher_chunk >= 0).sum().float()
                                                / view.positions("start").sum().float().clamp_min(1.0))
    if view.mismatched is not None:
        out["xtok/mismatched_frac"] = frac(view.mismatched)
    if view.invalid_utf8 is not None:
        out["xtok/invalid_utf8_frac"] = frac(view.invalid_utf8)
    return {k: v.cpu() for k, v in out.items()}


def per_chunk_sum(values: Tensor, chunk: Tensor, width: int) -> Tensor:
    """[B, width]: Σ of ``values`` [B, N] by chunk index ``chunk`` [B, N] (negative: left out)."""
    sums = values.new_zeros(values.shape[0], width)
    ok = chunk >= 0
    return sums.scatter_add_(1, chunk.clamp_min(0), torch.where(ok, values, torch.zeros_like(values)))


def full_support(targets: Tensor, vocab: int) -> Support:
    """Every id at every position: [B, T, V] (for losses over the full vocabulary)."""
    ids = torch.arange(vocab, device=targets.device).expand(*targets.shape, vocab)
    return Support(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool))


def _chunks(n: int, parts: int) -> list[slice]:
    """Exactly min(parts, n) consecutive, near-equal slices of range(n)."""
    parts = max(1, min(parts, n))
    bounds = [i * n // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _chunks_of(rows: slice, parts: int) -> list[slice]:
    n = rows.stop - rows.start
    return [slice(rows.start + s.start, rows.start + s.stop) for s in _chunks(n, max(1, min(parts, n)))]
