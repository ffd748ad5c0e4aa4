"""Forward KL on the support (teacher in front): ℓ_t = Σ_{v∈S_t} q(v) (log q(v) - log π(v)).
With ``renormalise: false`` (default) both sides are full-softmax probabilities, as in the
entropy-aware OPD paper; with ``renormalise: true`` both are renormalised on S_t first.
Options: renormalise. Reads Scores.support_logits (+ lse); output token_loss [B, T]."""

from __future__ import annotations

from torch import Tensor

from opdlm.ops.kl import masked_log_softmax, support_forward_kl
from opdlm.plugin_api import Loss
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput


def topk_forward_kl(inputs: LossInputs, renormalise: bool) -> Tensor:
    valid = inputs.support.valid
    if renormalise:
        ls = masked_log_softmax(inputs.student.support_logits, valid)
        lt = masked_log_softmax(inputs.teacher.support_logits.detach(), valid)
    else:
        ls = inputs.student.support_logprobs()
        lt = inputs.teacher.support_logprobs().detach()
    return support_forward_kl(ls, lt, valid)


@LOSSES.register("forward_kl_topk")
class ForwardKLTopK(Loss):
    """Forward KL q log(q/π) on the support (optionally renormalised)."""


    def __init__(self, *, renormalise: bool = False) -> None:
        self.renormalise = renormalise

    def compute(self, inputs: LossInputs) -> LossOutput:
        return LossOutput(token_loss=topk_forward_kl(inputs, self.renormalise))
