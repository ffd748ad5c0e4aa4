"""Numerically stable pieces shared by the divergence losses: masked log-softmax over a support
and log(1 - exp(x)) for the tail mass."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Mächler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) far below it. x = 0 gives -inf."""
    x = x.clamp_max(0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def masked_log_softmax(logits: Tensor, valid: Tensor) -> Tensor:
    """log-softmax over the valid entries of the last axis (invalid entries get a very negative
    value, never -inf, so products with zero probabilities stay finite)."""
    neg = torch.finfo(logits.dtype).min
    return torch.log_softmax(logits.masked_fill(~valid, neg), dim=-1)


def masked_sum(terms: Tensor, valid: Tensor) -> Tensor:
    """Sum over the last axis of the valid entries only."""
    return torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)


def support_reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, valid: Tensor) -> Tensor:
    """Σ_{v valid} π(v) (log π(v) - log q(v)) from log-probs on a support [..., K]."""
    return masked_sum(student_logprobs.exp() * (student_logprobs - teacher_logprobs), valid)


def support_forward_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, valid: Tensor) -> Tensor:
    """Σ_{v valid} q(v) (log q(v) - log π(v)) from log-probs on a support [..., K]."""
    return masked_sum(teacher_logprobs.exp() * (teacher_logprobs - student_logprobs), valid)


def reverse_kl_grad(ls: Tensor, lt: Tensor) -> tuple[Tensor, Tensor]:
    """(KL(π ‖ q) [n], its gradient with respect to the student's logits [n, V]) from full log-probs
    ls = log π, lt = log q [n, V]: ∂/∂z_v = π_v (log π_v − log q_v − KL). Overwrites ``ls``."""
    p = ls.exp()
    d = ls.sub_(lt)
    kl = torch.linalg.vecdot(p, d)
    return kl, p.mul_(d.sub_(kl.unsqueeze(1)))


def forward_kl_grad(ls: Tensor, lt: Tensor) -> tuple[Tensor, Tensor]:
    """(KL(q ‖ π) [n], its gradient with respect to the student's logits [n, V]) from full log-probs:
    ∂/∂z_v = π_v Σ_u q_u − q_v (Σ_u q_u = 1 unless the teacher has ids past the student's).
    Overwrites both arguments."""
    q = lt.exp()
    kl = torch.linalg.vecdot(q, lt.sub_(ls))
    return kl, ls.exp_().mul_(q.sum(-1, keepdim=True)).sub_(q)


def jsd_grad(ls: Tensor, lt: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(the generalised JSD [n] for 0 < β < 1, its gradient with respect to the student's logits) from
    full log-probs: with M = β q + (1 − β) π, ℓ = β KL(q ‖ M) + (1 − β) KL(π ‖ M) and
    ∂ℓ/∂π_v = (1 − β) log(π_v / M_v), so ∂ℓ/∂z_v = π_v (g_v − Σ_u π_u g_u) for that g."""
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1.0 - beta))
    p, q = ls.exp(), lt.exp()
    g = ls.sub_(lm).mul_(1.0 - beta)  # (1 − β) (log π − log M)
    mean_g = torch.linalg.vecdot(p, g)
    val = beta * torch.linalg.vecdot(q, lt.sub_(lm)) + mean_g
    return val, p.mul_(g.sub_(mean_g.unsqueeze(1)))
