"""The memory-lean student head: logits exist for one chunk of positions at a time, in the forward
pass and in the backward pass, so the extra memory of the loss path grows with the chunk size and K,
never with B·T·V.

Two schedules, both exact (the gradients are those of the naive path, up to float summation order):

- fused (the loss is position-wise: ℓ_t reads the student's quantities at t only): each chunk runs
  head → quantities → loss → backward at once, the way fused linear-cross-entropy kernels compute a
  chunk's gradient in its forward pass. The loss sees full [B, T] tensors in which only the chunk's
  positions carry the chunk's values and a graph; the head runs once per chunk forward and twice
  backward (dW and dh), like the naive path.
- recompute (any loss): the quantities of every chunk without a graph first, then the loss and its
  gradient with respect to those [B, T, K] quantities, then each chunk again with a graph, fed that
  gradient. One extra forward of the head.

The body's hidden states are computed once; their gradient is gathered chunk by chunk and sent
through the body in one backward call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace

import torch
from torch import Tensor, nn

from opdlm.ops.head import head_scores
from opdlm.types import Scores

DIFF_FIELDS = ("token_logprob", "lse", "support_logits", "byte_logprobs")


def _chunk_scores(h: Tensor, head: nn.Linear, targets: Tensor, support: Tensor | None, kw: dict) -> Scores:
    """Scores of n positions given as [n, H] (head_scores on a [1, n] batch)."""
    s = head_scores(h.unsqueeze(0), head, targets.unsqueeze(0),
                    support_ids=support.unsqueeze(0) if support is not None else None, **kw)
    return Scores(**{f.name: (getattr(s, f.name)[0] if getattr(s, f.name) is not None else None)
                     for f in fields(Scores)})


def _assemble(parts: list[tuple[int, int, Scores]], n: int, shape: tuple[int, int], like: Scores) -> Scores:
    """Full [B, T, ...] Scores from chunk Scores (positions outside every part are 0)."""
    out = {}
    for f in fields(Scores):
        first = getattr(like, f.name)
        if first is None:
            out[f.name] = None
            continue
        tail = tuple(first.shape[1:])
        pieces = []
        pos = 0
        for s, e, sc in parts:
            if s > pos:
                pieces.append(first.new_zeros((s - pos, *tail)))
            pieces.append(getattr(sc, f.name))
            pos = e
        if pos < n:
            pieces.append(first.new_zeros((n - pos, *tail)))
        out[f.name] = torch.cat(pieces).reshape(*shape, *tail)
    return Scores(**out)


def lean_backward(feats: Tensor, head: nn.Linear, targets: Tensor, support_ids: Tensor | None,
                  objective: Callable[[Scores], tuple[Tensor, Tensor]], *, chunk_size: int,
                  positionwise: bool, backward: Callable[[Tensor, Tensor], None], **kw) -> Scores:
    """Backpropagate ``objective`` through the LM head chunk by chunk; returns the student's Scores
    (detached) for diagnostics.

    feats [B, T, H] hidden states (with a graph into the body); targets [B, T]; support_ids
    [B, T, K] or None; objective(scores) -> (scalar to minimise, token_loss [B, T] detached or not);
    backward(feats, grad) sends the gathered gradient through the body; kw go to head_scores
    (temperature, vocab_rows, buckets, n_buckets, entropy)."""
    B, T, H = feats.shape
    n = B * T
    h_all = feats.detach().reshape(n, H)
    tgt = targets.reshape(n)
    sup = support_ids.reshape(n, -1) if support_ids is not None else None
    step = max(1, chunk_size)
    bounds = [(s, min(n, s + step)) for s in range(0, n, step)]
    grad_h = torch.zeros_like(h_all)
    kept: list[tuple[int, int, Scores]] = []
    if positionwise:
        for s, e in bounds:
            h = h_all[s:e].detach().requires_grad_(True)
            sc = _chunk_scores(h, head, tgt[s:e], sup[s:e] if sup is not None else None, kw)
            full = _assemble([(s, e, sc)], n, (B, T), sc)
            total, _ = objective(full, (s, e))
            total.backward()
            grad_h[s:e] = h.grad
            kept.append((s, e, _detached(sc)))
    else:
        with torch.no_grad():
            for s, e in bounds:
                kept.append((s, e, _chunk_scores(h_all[s:e], head, tgt[s:e], sup[s:e] if sup is not None else None, kw)))
        full = _assemble(kept, n, (B, T), kept[0][2])
        leaves = {k: getattr(full, k).detach().requires_grad_(True) for k in DIFF_FIELDS if getattr(full, k) is not None}
        total, _ = objective(replace(full, **leaves), None)
        grads = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()), allow_unused=True)))
        for s, e in bounds:
            h = h_all[s:e].detach().requires_grad_(True)
            sc = _chunk_scores(h, head, tgt[s:e], sup[s:e] if sup is not None else None, kw)
            outs, gs = [], []
            for k, g in grads.items():
                if g is not None:
                    outs.append(getattr(sc, k))
                    gs.append(g.reshape(n, *g.shape[2:])[s:e])
            if outs:
                torch.autograd.backward(outs, gs)
                grad_h[s:e] = h.grad if h.grad is not None else 0.0
    backward(feats, grad_h.reshape(B, T, H))
    return _assemble(kept, n, (B, T), kept[0][2])


def _detached(sc: Scores) -> Scores:
    return Scores(**{f.name: (getattr(sc, f.name).detach() if getattr(sc, f.name) is not None else None)
                     for f in fields(Scores)})
