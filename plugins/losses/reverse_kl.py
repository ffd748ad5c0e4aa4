"""Reverse KL(π ‖ q), the reference the truncated losses approximate:
ℓ_t = Σ_v π(v) (log π(v) - log q(v)) with full-softmax log-probs of both models.

``full: true`` (default): over every id. The engine hands the loss a support of the whole
vocabulary, whatever support is configured: [B, T, V] on the naive head path, one block of
positions at a time on the lean one (``divergence``).
``full: false``: over the configured support S_t, not renormalised (the LSM paper's ablation that
collapses; registered as ``lsm_unnormalised`` too).
Options: full. Reads Scores.support_logits and lse; output token_loss [B, T]."""

from __future__ import annotations

from torch import Tensor

from opdlm.ops.kl import reverse_kl_grad, support_reverse_kl
from opdlm.plugin_api import Loss
from opdlm.reads import Reads
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput


@LOSSES.register("reverse_kl")
class ReverseKL(Loss):
    """Reverse KL(π ‖ q) over the full vocabulary, or on the support unrenormalised (full: false)."""

    def __init__(self, *, full: bool = True) -> None:
        self.full = full
        self.reads = Reads.of("support_logits", "lse", vocabulary="full" if full else "support")

    def compute(self, inputs: LossInputs) -> LossOutput:
        ls = inputs.student.support_logprobs()
        lt = inputs.teacher.support_logprobs().detach()
        return LossOutput(token_loss=support_reverse_kl(ls, lt, inputs.support.valid))

    def divergence(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)

    def divergence_grad(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> tuple[Tensor, Tensor]:
        return reverse_kl_grad(student_logprobs, teacher_logprobs)


LOSSES.alias("lsm_unnormalised", "reverse_kl", full=False)
