"""The memory-lean student head, as an autograd Function: the [B, T, V] logits exist for one block
of positions at a time, in the forward pass and in the backward pass, so the extra memory of the
loss path grows with the block size and K, never with B·T·V.

Forward: per block, logits = h Wᵀ + b (restricted to the tokenizer's rows, divided by the
temperature), and from them the [B, T, K]-sized quantities every loss reads: the sampled token's
log-prob, the log-sum-exp, the logits on the support, the first-byte marginals, and (without
gradient) the entropy. Nothing of size V is kept.

Backward: per block, the logits are recomputed and their gradient is written in closed form from
the gradients of those quantities (p = softmax(z), e_v = one-hot):

    ∂ token_logprob / ∂z = e_target − p        ∂ lse / ∂z = p
    ∂ support_logits_k / ∂z = e_{ids_k}          ∂ byte_logprob_b / ∂z_v = p_v [bucket(v) = b] / P_b − p_v

then dh = dz W and dW = dzᵀ h, db = Σ dz. The Function returns the gradients of the hidden states
and of the head's parameters, so autograd owns them: data-parallel gradient hooks (DDP's reducer),
sharded parameters (FSDP) and gradient accumulation treat the head like any other layer, and the
loss is computed once, over the [B, T, K] quantities.

Cost: the head's matmul runs once in the forward pass and three times in the backward pass (the
recomputation, dh and dW), against once and twice on the naive path; in exchange the backward pass
makes two passes over each block's logits instead of the naive path's many over [B, T, V].

Under autocast (bf16-mixed) the matmuls run in the autocast dtype, as the naive path's linear layer
does, and the softmax statistics in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from opdlm.ops.head import Scratch, exp_stats, head_scores, linear_logits, matmul_dtype
from opdlm.types import Scores


class HeadGrads:
    """Gradients of a head's input (hidden states [n, H]) and parameters, filled block by block from
    the gradient of the block's logits: dh = dz W, dW = dzᵀ h, db = Σ dz (the matmuls in ``dtype``,
    the sums in the parameters' dtype). Only what autograd asks for (ctx.needs_input_grad) is made."""

    def __init__(self, ctx, feats: Tensor, weight: Tensor, bias: Tensor | None, rows: int, dtype: torch.dtype) -> None:
        self.weight, self.rows, self.dtype = weight, rows, dtype
        self.d_h = torch.zeros_like(feats) if ctx.needs_input_grad[0] else None
        self.d_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        self.d_b = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None

    def add(self, s: int, e: int, h: Tensor, dz: Tensor, only: Tensor | None = None) -> None:
        """Positions s:e with hidden states h [e - s, H] and logits' gradient dz [e - s, rows]; with
        ``only`` (row numbers within the block), dz [len(only), rows] holds those rows' gradient
        and the other rows' is 0."""
        rows, dtype = self.rows, self.dtype
        if only is not None:
            h = h.index_select(0, only)
        dzm = dz.to(dtype)
        with torch.autocast(h.device.type, enabled=False):
            if self.d_h is not None:
                d = (dzm @ self.weight[:rows].to(dtype)).to(self.d_h.dtype)
                if only is None:
                    self.d_h[s:e] = d
                else:
                    self.d_h[s + only] = d
            if self.d_w is not None:
                if dtype == self.d_w.dtype:
                    self.d_w[:rows].addmm_(dzm.t(), h.to(dtype))
                else:
                    self.d_w[:rows].add_((dzm.t() @ h.to(dtype)).to(self.d_w.dtype))
        if self.d_b is not None:
            self.d_b[:rows].add_(dz.sum(0).to(self.d_b.dtype))

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.d_h, self.d_w, self.d_b


class _LeanHead(torch.autograd.Function):
    """(feats [n, H], weight [V, H], bias [V] | None) -> token_logprob [n], lse [n],
    support_logits [n, K] (empty without a support), byte_logprobs [n, nb] (empty without buckets),
    entropy [n] (no gradient; empty when not asked for)."""

    @staticmethod
    def forward(ctx, feats: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, support: Tensor | None,
                buckets: Tensor | None, n_buckets: int, rows: int, temperature: float, block: int,
                entropy: bool) -> tuple[Tensor, ...]:
        n = feats.shape[0]
        dtype = matmul_dtype(feats.device.type, weight)
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        tok = feats.new_empty(n, dtype=stat)
        lse = feats.new_empty(n, dtype=stat)
        sl = feats.new_empty((n, support.shape[1]) if support is not None else (0,), dtype=stat)
        bl = feats.new_empty((n, n_buckets) if buckets is not None else (0,), dtype=stat)
        ent = feats.new_empty(n if entropy else 0, dtype=stat)
        tgt = targets.clamp_min(0)
        scratch = Scratch()
        for s in range(0, n, block):
            e = min(n, s + block)
            z = linear_logits(feats[s:e], weight, bias, rows, temperature, dtype, scratch)
            tok_logit = z.gather(1, tgt[s:e, None]).squeeze(1)
            if support is not None:
                sl[s:e] = z.gather(1, support[s:e])
            m = z.amax(-1, keepdim=True)
            tot, dot, sums = exp_stats(z, m, entropy, buckets, n_buckets)
            lse_c = tot.log() + m.squeeze(-1)
            lse[s:e] = lse_c
            tok[s:e] = tok_logit - lse_c
            if entropy:  # H = lse − Σ p z = log Σe − Σ e·(z − max) / Σe
                ent[s:e] = tot.log() - dot / tot
            if sums is not None:
                bl[s:e] = sums.div_(tot.unsqueeze(1)).log_()
            del z
        ctx.save_for_backward(feats, weight, bias, tgt, support, buckets, lse, bl)
        ctx.cfg = (rows, temperature, block, dtype)
        ctx.mark_non_differentiable(ent)
        return tok, lse, sl, bl, ent

    @staticmethod
    def backward(ctx, g_tok: Tensor | None, g_lse: Tensor | None, g_sl: Tensor | None, g_bl: Tensor | None,
                 _g_ent: Tensor | None) -> tuple[Tensor | None, ...]:
        feats, weight, bias, tgt, support, buckets, lse, bl = ctx.saved_tensors
        rows, temperature, block, dtype = ctx.cfg
        n = feats.shape[0]
        grads = HeadGrads(ctx, feats, weight, bias, rows, dtype)
        # per position: dz = p * (c + d[bucket]) + sparse terms
        c = torch.zeros_like(lse)
        if g_lse is not None:
            c = c + g_lse
        if g_tok is not None:
            c = c - g_tok
        d = None
        if g_bl is not None and buckets is not None and g_bl.numel():
            c = c - g_bl.sum(-1)
            prob = bl.exp()
            d = torch.where(prob > 0, g_bl / prob.clamp_min(torch.finfo(prob.dtype).tiny), torch.zeros_like(prob))
        use_sup = g_sl is not None and support is not None and g_sl.numel() > 0
        scale = 1.0 / temperature
        scratch = Scratch()
        for s in range(0, n, block):
            e = min(n, s + block)
            h = feats[s:e]
            z = linear_logits(h, weight, bias, rows, temperature, dtype, scratch)
            dz = z.sub_(lse[s:e, None]).exp_()  # p, in place
            if d is not None:
                dz.mul_(c[s:e, None] + d[s:e].index_select(1, buckets[:rows]))
            else:
                dz.mul_(c[s:e, None])
            if g_tok is not None:
                dz.scatter_add_(1, tgt[s:e, None], g_tok[s:e, None].to(dz.dtype))
            if use_sup:
                dz.scatter_add_(1, support[s:e], g_sl[s:e].to(dz.dtype))
            if scale != 1.0:
                dz.mul_(scale)
            grads.add(s, e, h, dz)
            del z, dz
        return *grads.result(), None, None, None, None, None, None, None, None


def lean_scores(feats: Tensor, head: nn.Linear, targets: Tensor, *, support_ids: Tensor | None = None,
                temperature: float = 1.0, vocab_rows: int | None = None, block: int = 1024,
                buckets: Tensor | None = None, n_buckets: int = 0, entropy: bool = True) -> Scores:
    """The student's Scores at every position of ``feats`` [B, T, H] through the lean head; the
    same values as ``head_scores`` (opdlm.ops.head) and, through autograd, the same gradients.

    targets [B, T] sampled ids (negative = none); support_ids [B, T, K]; vocab_rows: logits past this
    row are excluded; buckets [V] long with n_buckets bins (first-byte marginals)."""
    B, T, H = feats.shape
    n = B * T
    rows = min(vocab_rows or head.weight.shape[0], head.weight.shape[0])
    sup = support_ids.reshape(n, -1) if support_ids is not None else None
    tok, lse, sl, bl, ent = _LeanHead.apply(
        feats.reshape(n, H), head.weight, head.bias, targets.reshape(n), sup,
        buckets, n_buckets, rows, float(temperature), max(1, int(block)), entropy)
    return Scores(
        token_logprob=tok.reshape(B, T),
        lse=lse.reshape(B, T),
        support_logits=sl.reshape(B, T, -1) if sup is not None else None,
        entropy=ent.reshape(B, T) if entropy else None,
        byte_logprobs=bl.reshape(B, T, n_buckets) if buckets is not None else None,
    )


def trained_scores(feats: Tensor, head: nn.Linear | None, targets: Tensor, *, lean: bool, block: int,
                   support_ids: Tensor | None = None, **kw: Any) -> Scores:
    """The trained model's Scores with gradients: through the lean head (``lean``: one block of
    positions' logits at a time, backward in closed form) or by autograd over the whole logits
    (opdlm.ops.head.head_scores). The same values and gradients either way; ``kw`` as both take."""
    if lean and head is not None:
        return lean_scores(feats, head, targets, support_ids=support_ids, block=block, **kw)
    return head_scores(feats, head, targets, support_ids=support_ids, **kw)
