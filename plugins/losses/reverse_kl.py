"""Full-vocabulary reverse KL, the reference the truncated losses approximate:
ℓ_t = Σ_v π(v) (log π(v) - log q(v)) over every id. The engine hands this loss a support of the
whole vocabulary (``full_vocabulary``), whatever support is configured: [B, T, V] on the naive head
path, one chunk of positions at a time on the lean one (``divergence``).
No options. Output token_loss [B, T]."""

from __future__ import annotations

from torch import Tensor

from opdlm.ops.kl import support_reverse_kl
from opdlm.plugin_api import Loss
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput


@LOSSES.register("reverse_kl")
class ReverseKL(Loss):
    """Reverse KL(π ‖ q) over the full vocabulary."""


    full_vocabulary = True

    def __init__(self) -> None:
        pass

    def compute(self, inputs: LossInputs) -> LossOutput:
        ls = inputs.student.support_logprobs()
        lt = inputs.teacher.support_logprobs().detach()
        return LossOutput(token_loss=support_reverse_kl(ls, lt, inputs.support.valid))

    def divergence(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)
