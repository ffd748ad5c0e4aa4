"""Generalised Jensen-Shannon divergence of GKD (Agarwal et al.) on the support, TRL's convention:
M = β·q + (1-β)·π, ℓ_t = β·KL(q ‖ M) + (1-β)·KL(π ‖ M); β = 0 is the forward KL(q ‖ π) and
β = 1 the reverse KL(π ‖ q) (the two ends are taken as those limits' targets, as TRL does).
Both distributions are renormalised on the support; with ``full: true`` the engine passes the whole
vocabulary as the support (the full-vocabulary JSD: [B, T, V] on the naive head path, one chunk of
positions at a time on the lean one, through ``divergence``).
Options: beta in [0, 1], full. Reads Scores.support_logits; output [B, T]."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from opdlm.ops.kl import forward_kl_grad, jsd_grad, masked_log_softmax, masked_sum, reverse_kl_grad
from opdlm.plugin_api import Loss
from opdlm.reads import Reads
from opdlm.registry import LOSSES
from opdlm.schema import Range
from opdlm.types import LossInputs, LossOutput


@LOSSES.register("jsd")
class JSD(Loss):
    """Generalised JSD with mixture weight beta (0 = forward KL, 1 = reverse KL) on the support."""


    def __init__(self, *, beta: Annotated[float, Range(ge=0, le=1)] = 0.5, full: bool = False) -> None:
        self.beta = beta
        self.full = full
        self.reads = Reads.of("support_logits", vocabulary="full" if full else "support")

    def compute(self, inputs: LossInputs) -> LossOutput:
        valid = inputs.support.valid
        ls = masked_log_softmax(inputs.student.support_logits, valid)
        lt = masked_log_softmax(inputs.teacher.support_logits.detach(), valid)
        return LossOutput(token_loss=self._jsd(ls, lt, valid))

    def divergence(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return self._jsd(student_logprobs, teacher_logprobs, None)

    def divergence_grad(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> tuple[Tensor, Tensor]:
        if self.beta == 0.0:
            return forward_kl_grad(student_logprobs, teacher_logprobs)
        if self.beta == 1.0:
            return reverse_kl_grad(student_logprobs, teacher_logprobs)
        return jsd_grad(student_logprobs, teacher_logprobs, self.beta)

    def _jsd(self, ls: Tensor, lt: Tensor, valid: Tensor | None) -> Tensor:
        """The generalised JSD from log-probs on a support (valid None: every entry counts)."""
        if valid is None:
            valid = torch.ones((), dtype=torch.bool, device=ls.device).expand(ls.shape)
        b = self.beta
        if b == 0.0:
            loss = masked_sum(lt.exp() * (lt - ls), valid)
        elif b == 1.0:
            loss = masked_sum(ls.exp() * (ls - lt), valid)
        else:
            lm = torch.logsumexp(torch.stack([lt + math.log(b), ls + math.log(1.0 - b)]), dim=0)
            loss = (b * masked_sum(lt.exp() * (lt - lm), valid)
                    + (1.0 - b) * masked_sum(ls.exp() * (ls - lm), valid))
        return loss
