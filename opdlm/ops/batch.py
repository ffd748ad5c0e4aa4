"""Batch plumbing of the OPD stage: row slices of batch-first dataclasses, mini/micro-batch
bounds, the full-vocabulary support, and the cross-tokenizer alignment diagnostics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from opdlm.types import Rollout, Support, TeacherView


def take(x: Any, rows: slice | Tensor) -> Any:
    """Rows of a batch-first dataclass (tensors and lists sliced or indexed by a long tensor of
    row numbers, scalars kept)."""
    if isinstance(x, Tensor):
        if x.dim() and x.stride(0) == 0:  # a broadcast view (the full-vocabulary support): stays one
            n = len(rows) if isinstance(rows, Tensor) else len(range(*rows.indices(x.shape[0])))
            return x[:1].expand(n, *x.shape[1:])
        return x[rows.to(x.device) if isinstance(rows, Tensor) else rows]
    if isinstance(x, list):
        return [x[i] for i in rows.tolist()] if isinstance(rows, Tensor) else x[rows]
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
    """Every id at every position: [B, T, V] (for losses over the full vocabulary), as broadcast
    views that hold V numbers, not B·T·V."""
    ids = torch.arange(vocab, device=targets.device).expand(*targets.shape, vocab)
    return Support(ids=ids, valid=torch.ones((), dtype=torch.bool, device=targets.device).expand(ids.shape))


def mini_batch_rows(n: int, parts: int) -> list[Tensor]:
    """Row numbers of min(parts, n) mini-batches of range(n), strided: mini-batch m holds rows
    m, m + parts, ... On several processes each rank splits its own rows this way, so mini-batch m
    of the global batch (the ranks' rollouts concatenated in rank order) is the union of the ranks'
    m-th mini-batches whenever every rank holds a multiple of ``parts`` rows."""
    parts = max(1, min(parts, n))
    return [torch.arange(m, n, parts) for m in range(parts)]


def micro_batch_rows(rows: Tensor, parts: int) -> list[Tensor]:
    """min(parts, len(rows)) consecutive, near-equal pieces of ``rows``."""
    n = len(rows)
    parts = max(1, min(parts, n))
    bounds = [i * n // parts for i in range(parts + 1)]
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One Rollout holding the rows of several (prompts left-padded to the longest prompt,
    responses right-padded to the longest response), as one process would hold them."""
    P = max(r.prompt_len for r in parts)
    T = max(r.response_mask.shape[1] for r in parts)

    def pad(t: Tensor, left: int, right: int, value: float | int) -> Tensor:
        return torch.nn.functional.pad(t, (left, right), value=value)

    cols: dict[str, list[Tensor]] = {k: [] for k in ("input_ids", "attention_mask", "response_mask", "behaviour_logprobs")}
    if any(r.outcomes is not None for r in parts) and any(r.outcomes is None for r in parts):
        raise ValueError("concat_rollouts: cannot join multi-turn and single-turn rollouts")
    for r in parts:
        left, right = P - r.prompt_len, T - r.response_mask.shape[1]
        cols["input_ids"].append(pad(r.input_ids, left, right, pad_id))
        cols["attention_mask"].append(pad(r.attention_mask, left, right, 0))
        cols["response_mask"].append(pad(r.response_mask, 0, right, False))
        cols["behaviour_logprobs"].append(pad(r.behaviour_logprobs, 0, right, 0.0))
    out = {k: torch.cat(v) for k, v in cols.items()}
    out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp_min(0)  # as the sampler makes them
    return Rollout(**out, prompt_len=P,
                   truncated=torch.cat([r.truncated for r in parts]),
                   examples=[e for r in parts for e in r.examples], texts=[t for r in parts for t in r.texts],
                   outcomes=None if any(r.outcomes is None for r in parts) else [o for r in parts for o in r.outcomes or []])
