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
