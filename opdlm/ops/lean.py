"""The memory-lean student head: logits exist for one chunk of positions at a time, in the forward
pass and in the backward pass, so the extra memory of the loss path grows with the chunk size and K,
never with B·T·V.

Two schedules, both exact (the gradients are those of the naive path, up to float summation order):

- fused (the loss is position-wise: ℓ_t reads the student's quantities at t only): each chunk runs
  head → quantities → loss → backward at once, the way fused linear-cross-entropy kernels compute a
  chunk's gradient in its forward pass. The loss sees full [B, T] tensors in which only the chunk's
  positions carry the chunk's values and a graph; the head runs once per chunk forward and twice
  backward (dW and dh), like the naive path. dW is accumulated in place into the weight's gradient,
  so not even a [V, H] temporary is made per chunk.
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


def _chunk_scores(h: Tensor, head: nn.Linear | None, targets: Tensor, support: Tensor | None, kw: dict) -> Scores:
    """Scores of n positions given as hidden states [n, H] (or logits [n, V] with head None)."""
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


def _head_logits(h: Tensor, head: nn.Linear) -> Tensor:
    """Logits of a chunk as a leaf that collects their gradient (no graph into the head)."""
    with torch.no_grad():
        z = nn.functional.linear(h, head.weight, head.bias)
    return z.requires_grad_(True)


def _head_grads(dz: Tensor, h: Tensor, head: nn.Linear) -> Tensor:
    """Accumulate the head's parameter gradients from the logits' gradient dz [n, V] in place (no
    [V, H] temporary) and return the gradient of the hidden states [n, H]. The sum is kept in the
    gradient's dtype: with bf16 weights (bf16-true) it is rounded once per chunk, not once."""
    w = head.weight
    with torch.no_grad():
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        w.grad.addmm_(dz.t().to(w.grad.dtype), h.to(w.grad.dtype))
        if head.bias is not None:
            if head.bias.grad is None:
                head.bias.grad = torch.zeros_like(head.bias)
            head.bias.grad.add_(dz.sum(0).to(head.bias.grad.dtype))
        return dz.to(w.dtype) @ w if dz.dtype != w.dtype else dz @ w


def lean_backward(feats: Tensor, head: nn.Linear, targets: Tensor, support_ids: Tensor | None,
                  objective: Callable[[Scores, tuple[int, int] | None], tuple[Tensor, Tensor]], *,
                  chunk_size: int, positionwise: bool, **kw) -> tuple[Scores, Tensor]:
    """Backpropagate ``objective`` through the LM head chunk by chunk. Returns the student's Scores
    (detached, for diagnostics) and the gradient of ``feats`` (to send through the body).

    feats [B, T, H] hidden states; targets [B, T]; support_ids [B, T, K] or None;
    objective(scores, span) -> (scalar to minimise over the positions in span (all when None),
    token_loss); kw go to head_scores (temperature, vocab_rows, buckets, n_buckets, entropy).
    The head's parameter gradients are accumulated in place."""
    B, T, H = feats.shape
    n = B * T
    h_all = feats.detach().reshape(n, H)
    tgt = targets.reshape(n)
    sup = support_ids.reshape(n, -1) if support_ids is not None else None
    step = max(1, chunk_size)
    bounds = [(s, min(n, s + step)) for s in range(0, n, step)]
    grad_h = torch.zeros_like(h_all)
    kept: list[tuple[int, int, Scores]] = []

    def scores_of(z: Tensor, s: int, e: int) -> Scores:
        return _chunk_scores(z, None, tgt[s:e], sup[s:e] if sup is not None else None, kw)

    if positionwise:
        for s, e in bounds:
            z = _head_logits(h_all[s:e], head)
            sc = scores_of(z, s, e)
            total, _ = objective(_assemble([(s, e, sc)], n, (B, T), sc), (s, e))
            total.backward()
            if z.grad is not None:
                grad_h[s:e] = _head_grads(z.grad, h_all[s:e], head)
            kept.append((s, e, _detached(sc)))
            del z, sc, total
    else:
        with torch.no_grad():
            for s, e in bounds:
                kept.append((s, e, _chunk_scores(h_all[s:e], head, tgt[s:e], sup[s:e] if sup is not None else None, kw)))
        full = _assemble(kept, n, (B, T), kept[0][2])
        leaves = {k: getattr(full, k).detach().requires_grad_(True) for k in DIFF_FIELDS if getattr(full, k) is not None}
        total, _ = objective(replace(full, **leaves), None)
        grads = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()), allow_unused=True)))
        for s, e in bounds:
            z = _head_logits(h_all[s:e], head)
            sc = scores_of(z, s, e)
            outs, gs = [], []
            for k, g in grads.items():
                if g is not None:
                    outs.append(getattr(sc, k))
                    gs.append(g.reshape(n, *g.shape[2:])[s:e])
            if outs:
                torch.autograd.backward(outs, gs)
                if z.grad is not None:
                    grad_h[s:e] = _head_grads(z.grad, h_all[s:e], head)
            del z, sc
    return _assemble(kept, n, (B, T), kept[0][2]), grad_h.reshape(B, T, H)


def _detached(sc: Scores) -> Scores:
    return Scores(**{f.name: (getattr(sc, f.name).detach() if getattr(sc, f.name) is not None else None)
                     for f in fields(Scores)})
