"""Truncated reverse KL on the support *without* renormalisation (the LSM paper's ablation that
collapses): ℓ_t = Σ_{v∈S_t} π(v) (log π(v) - log q(v)) with full-softmax log-probs of both models.
No options. Reads Scores.support_logits and Scores.lse; output token_loss [B, T]."""

from __future__ import annotations

from opdlm.ops.kl import support_reverse_kl
from opdlm.plugin_api import Loss
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput


@LOSSES.register("lsm_unnormalised")
class LSMUnnormalised(Loss):
    """Truncated reverse KL on the support with full-softmax probabilities (no renormalisation)."""


    def __init__(self) -> None:
        pass

    def compute(self, inputs: LossInputs) -> LossOutput:
        ls = inputs.student.support_logprobs()
        lt = inputs.teacher.support_logprobs().detach()
        return LossOutput(token_loss=support_reverse_kl(ls, lt, inputs.support.valid))
