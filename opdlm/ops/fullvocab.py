"""Full-vocabulary divergences (reverse KL, forward KL, the full JSD) on the lean path, in one pass:
the student's and the teacher's [block, V] logits exist for one block of positions at a time, and
each block's logits are made once.

``full_vocab_loss`` is an autograd Function of the student's hidden states and head parameters
whose output is the step's loss Σ_t w_t ℓ_t (w: each position's weight in the step, the
aggregation's weights over its denominator). Because the weights are known before the pass, the
gradient is made in the same pass: per block,

    z_s = h W_sᵀ (+ b), z_q = h_q W_qᵀ (+ b_q)         the two heads, once each
    log π, log q                                         log-softmax of both
    ℓ, ∂ℓ/∂z_s = Loss.divergence_grad(log π, log q)       closed form (or autograd of ``divergence``)
    dz = w ∂ℓ/∂z_s / τ;  dh = dz W_s;  dW_s += dzᵀ h;  db_s += Σ dz

and backward only scales the gradients it kept by the gradient of the loss (1 in training). The
student's head matmul runs three times (as on the naive path) and the teacher's once: the
teacher's phase then runs only its body (opdlm.scoring), and this pass also gives the teacher's
sampled-token log-prob, log-sum-exp and entropy that the step log shows. Rows of weight 0
(padding, masked positions) skip the divergence and the gradient matmuls: their ℓ is 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from opdlm.ops.head import Scratch, exp_stats, linear_logits, matmul_dtype
from opdlm.ops.lean import HeadGrads
from opdlm.types import Scores


def _teacher_logits(h: Tensor, weight: Tensor | None, bias: Tensor | None, rows: int, temperature: float,
                    scratch: Scratch) -> Tensor:
    """The teacher's fp32 (at least) logits [n, rows] divided by the temperature (h: hidden states,
    or logits when ``weight`` is None)."""
    if weight is not None:
        return linear_logits(h, weight, bias, rows, temperature, matmul_dtype(h.device.type, weight), scratch)
    z = h[:, :rows].float() if h.dtype in (torch.float16, torch.bfloat16) else h[:, :rows].clone()
    return z.div_(temperature) if temperature != 1.0 else z


def _log_softmax_stats(z: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log-probs, written over z [n, V]; sampled-token log-prob [n]; log-sum-exp [n]; entropy [n]):
    the maximum, then one pass of exp in cache-sized rows (opdlm.ops.head.exp_stats), then z - lse."""
    m = z.amax(-1, keepdim=True)
    tot, dot, _ = exp_stats(z, m, True, None, 0)
    log_tot = tot.log()
    lse = log_tot + m.squeeze(1)
    lp = z.sub_(lse.unsqueeze(1))
    return lp, lp.gather(1, tgt[:, None]).squeeze(1), lse, log_tot - dot / tot


class _FullVocab(torch.autograd.Function):
    """(student feats [n, H], head weight, bias, teacher feats [n, H'] (or logits), teacher head
    weight, bias, targets [n], scale [n], loss, rows, temperature, block) -> the weighted loss (a
    scalar with gradients), then without gradients: ℓ [n], the student's sampled-token log-prob,
    log-sum-exp and entropy [n], and the teacher's."""

    @staticmethod
    def forward(ctx, s_feats: Tensor, s_weight: Tensor, s_bias: Tensor | None, t_feats: Tensor,
                t_weight: Tensor | None, t_bias: Tensor | None, targets: Tensor, scale: Tensor, loss: Any,
                s_rows: int, t_rows: int, temperature: float, block: int) -> tuple[Tensor, ...]:
        n = s_feats.shape[0]
        dtype = matmul_dtype(s_feats.device.type, s_weight)
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        out = {k: s_feats.new_zeros(n, dtype=stat) for k in ("val", "s_tok", "s_lse", "s_ent", "t_tok", "t_lse", "t_ent")}
        grads = HeadGrads(ctx, s_feats, s_weight, s_bias, s_rows, dtype)
        tgt = targets.clamp_min(0)
        total = s_feats.new_zeros((), dtype=stat)
        with torch.no_grad(), torch.autocast(s_feats.device.type, enabled=False):
            s_scratch, t_scratch = Scratch(), Scratch()
            for s in range(0, n, block):
                e = min(n, s + block)
                h = s_feats[s:e]
                ls, *st = _log_softmax_stats(linear_logits(h, s_weight, s_bias, s_rows, temperature, dtype, s_scratch),
                                             tgt[s:e])
                lt, *tt = _log_softmax_stats(_teacher_logits(t_feats[s:e], t_weight, t_bias, t_rows, temperature,
                                                             t_scratch), tgt[s:e])
                for k, v in zip(("s_tok", "s_lse", "s_ent", "t_tok", "t_lse", "t_ent"), (*st, *tt)):
                    out[k][s:e] = v
                w = scale[s:e].to(stat)
                rows = torch.nonzero(w).squeeze(1)
                if rows.numel() == 0:
                    continue
                whole = rows.numel() == e - s
                val, dz = loss.divergence_grad(ls if whole else ls[rows], (lt if whole else lt[rows])[:, :s_rows])
                del ls, lt
                out["val"][s + rows] = val.to(stat)
                total += (val.to(stat) * w[rows]).sum()
                dz = dz.mul_((w[rows] / temperature).to(dz.dtype).unsqueeze(1))
                grads.add(s, e, h, dz, None if whole else rows)
                del dz
        ctx.grads = grads.result()
        rest = tuple(out[k] for k in ("val", "s_tok", "s_lse", "s_ent", "t_tok", "t_lse", "t_ent"))
        ctx.mark_non_differentiable(*rest)
        return (total, *rest)

    @staticmethod
    def backward(ctx, g_total: Tensor | None, *_: Tensor | None) -> tuple[Tensor | None, ...]:
        kept = ctx.grads
        ctx.grads = None
        if g_total is None:
            return (None,) * 13
        scaled = tuple(None if g is None else (g if bool(g_total == 1) else g.mul_(g_total.to(g.dtype))) for g in kept)
        return *scaled, *([None] * 10)


def full_vocab_loss(feats: Tensor, head: nn.Linear, teacher_feats: Tensor, teacher_head: nn.Linear | None,
                    targets: Tensor, loss: Any, scale: Tensor, *, student_rows: int, teacher_rows: int,
                    temperature: float = 1.0, block: int = 1024) -> tuple[Tensor, Tensor, Scores, Scores]:
    """(Σ_t scale_t ℓ_t, a scalar with gradients to ``feats`` and ``head``; ℓ [B, T] (0 where scale
    is 0); the student's Scores and the teacher's, without gradients: sampled-token log-prob,
    log-sum-exp, entropy).

    feats [B, T, H]; teacher_feats [B, T, H'] (the teacher's logits [B, T, V'] when ``teacher_head``
    is None); targets [B, T] sampled ids; scale [B, T]: each position's weight in the step's loss;
    ``loss.divergence_grad(log π [n, V], log q [n, V]) -> (ℓ [n], ∂ℓ/∂z [n, V])``."""
    B, T, H = feats.shape
    n = B * T
    tw = teacher_head.weight.detach() if teacher_head is not None else None
    tb = teacher_head.bias.detach() if teacher_head is not None and teacher_head.bias is not None else None
    total, vals, s_tok, s_lse, s_ent, t_tok, t_lse, t_ent = _FullVocab.apply(
        feats.reshape(n, H), head.weight, head.bias, teacher_feats.reshape(n, -1).detach(), tw, tb,
        targets.reshape(n), scale.reshape(n).detach(), loss, student_rows, teacher_rows, float(temperature),
        max(1, int(block)))

    def scores(tok: Tensor, lse: Tensor, ent: Tensor) -> Scores:
        return Scores(token_logprob=tok.reshape(B, T), lse=lse.reshape(B, T), entropy=ent.reshape(B, T))
    return total, vals.reshape(B, T), scores(s_tok, s_lse, s_ent), scores(t_tok, t_lse, t_ent)
