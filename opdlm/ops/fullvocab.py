"""Full-vocabulary divergences (reverse KL, forward KL, the full JSD) on the lean path: the
student's and the teacher's [B, T, V] logits exist for one block of positions at a time, in the
forward and in the backward pass. The teacher's hidden states are kept (small: [B, T, H]) and its
head is run again per block, instead of keeping its [B, T, V] logits.

``full_vocab_loss`` is an autograd Function of the student's hidden states and head parameters:
forward computes ℓ_t = divergence(log π(·|c_t), log q(·|c_t)) per position (plus the student's
sampled-token log-prob, log-sum-exp and entropy for diagnostics); backward recomputes each block's
logits of both models and differentiates the loss plugin's own ``divergence`` on that block, then
returns dh = dz W and dW = dzᵀ h like opdlm.ops.lean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from opdlm.ops.lean import HeadGrads, _block_logits, _matmul_dtype
from opdlm.types import Scores

Divergence = Callable[[Tensor, Tensor], Tensor]  # (student log-probs [n, V], teacher log-probs [n, V]) -> [n]


def _teacher_logprobs(h: Tensor, weight: Tensor | None, bias: Tensor | None, rows: int, cols: int,
                      temperature: float) -> Tensor:
    """The teacher's log-probs [n, cols] over its ``rows`` ids (h: hidden states, or logits when
    ``weight`` is None)."""
    if weight is None:
        z = h[:, :rows].float() if h.dtype in (torch.float16, torch.bfloat16) else h[:, :rows]
        z = z / temperature if temperature != 1.0 else z
    else:
        z = _block_logits(h, weight, bias, rows, temperature, _matmul_dtype(h.device.type, weight))
    return torch.log_softmax(z, -1)[:, :cols]


class _FullVocab(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_feats: Tensor, s_weight: Tensor, s_bias: Tensor | None, t_feats: Tensor,
                t_weight: Tensor | None, t_bias: Tensor | None, targets: Tensor, fn: Divergence,
                s_rows: int, t_rows: int, temperature: float, block: int) -> tuple[Tensor, ...]:
        n = s_feats.shape[0]
        dtype = _matmul_dtype(s_feats.device.type, s_weight)
        vals, tok, lse, ent = [], [], [], []
        tgt = targets.clamp_min(0)
        for s in range(0, n, block):
            e = min(n, s + block)
            zs = _block_logits(s_feats[s:e], s_weight, s_bias, s_rows, temperature, dtype)
            z_lse = torch.logsumexp(zs, -1)
            ls = zs.sub_(z_lse.unsqueeze(1))  # log π, in place
            lt = _teacher_logprobs(t_feats[s:e], t_weight, t_bias, t_rows, s_rows, temperature)
            vals.append(fn(ls, lt))
            tok.append(ls.gather(1, tgt[s:e, None]).squeeze(1))
            lse.append(z_lse)
            ent.append(-torch.linalg.vecdot(ls.exp(), ls))
            del zs, ls, lt
        ctx.save_for_backward(s_feats, s_weight, s_bias, t_feats, t_weight, t_bias)
        ctx.cfg = (fn, s_rows, t_rows, temperature, block, dtype)
        tok_t, lse_t, ent_t = torch.cat(tok), torch.cat(lse), torch.cat(ent)
        ctx.mark_non_differentiable(tok_t, lse_t, ent_t)
        return torch.cat(vals), tok_t, lse_t, ent_t

    @staticmethod
    def backward(ctx, g_vals: Tensor | None, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        s_feats, s_weight, s_bias, t_feats, t_weight, t_bias = ctx.saved_tensors
        fn, s_rows, t_rows, temperature, block, dtype = ctx.cfg
        n = s_feats.shape[0]
        grads = HeadGrads(ctx, s_feats, s_weight, s_bias, s_rows, dtype)
        if g_vals is None:
            return *grads.result(), *([None] * 9)
        for s in range(0, n, block):
            e = min(n, s + block)
            h = s_feats[s:e]
            with torch.no_grad():
                lt = _teacher_logprobs(t_feats[s:e], t_weight, t_bias, t_rows, s_rows, temperature)
            z = _block_logits(h.detach(), s_weight.detach(), s_bias.detach() if s_bias is not None else None,
                              s_rows, temperature, dtype).requires_grad_(True)
            with torch.enable_grad():
                v = fn(torch.log_softmax(z, -1), lt)
                (dz,) = torch.autograd.grad(v, z, g_vals[s:e].to(v.dtype))
            if temperature != 1.0:
                dz = dz / temperature
            grads.add(s, e, h, dz)
            del z, v, dz, lt
        return *grads.result(), *([None] * 9)


def full_vocab_loss(feats: Tensor, head: nn.Linear, teacher_feats: Tensor, teacher_head: nn.Linear | None,
                    targets: Tensor, divergence: Divergence, *, student_rows: int, teacher_rows: int,
                    temperature: float = 1.0, block: int = 1024) -> tuple[Tensor, Scores]:
    """(ℓ [B, T] with gradients to ``feats`` and ``head``, the student's Scores without gradients:
    sampled-token log-prob, log-sum-exp, entropy). feats [B, T, H]; teacher_feats [B, T, H'] (the
    teacher's logits [B, T, V'] when ``teacher_head`` is None); divergence(log π [n, V], log q [n, V])
    -> [n], differentiable in log π."""
    B, T, H = feats.shape
    n = B * T
    tw = teacher_head.weight.detach() if teacher_head is not None else None
    tb = teacher_head.bias.detach() if teacher_head is not None and teacher_head.bias is not None else None
    vals, tok, lse, ent = _FullVocab.apply(
        feats.reshape(n, H), head.weight, head.bias, teacher_feats.reshape(n, -1).detach(), tw, tb,
        targets.reshape(n), divergence, student_rows, teacher_rows, float(temperature), max(1, int(block)))
    return vals.reshape(B, T), Scores(token_logprob=tok.reshape(B, T), lse=lse.reshape(B, T), entropy=ent.reshape(B, T))
