"""Full-vocabulary forward KL: ℓ_t = Σ_v q(v) (log q(v) - log π(v)) over every id (the engine
hands this loss a support of the whole vocabulary: [B, T, V] on the naive head path, one chunk of
positions at a time on the lean one, through ``divergence``). No options.
Output token_loss [B, T]."""

from __future__ import annotations

from torch import Tensor

from opdlm.ops.kl import support_forward_kl
from opdlm.plugin_api import Loss
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput


@LOSSES.register("forward_kl")
class ForwardKL(Loss):
    """Forward KL(q ‖ π) over the full vocabulary."""


    full_vocabulary = True

    def __init__(self) -> None:
        pass

    def compute(self, inputs: LossInputs) -> LossOutput:
        ls = inputs.student.support_logprobs()
        lt = inputs.teacher.support_logprobs().detach()
        return LossOutput(token_loss=support_forward_kl(ls, lt, inputs.support.valid))

    def divergence(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)
