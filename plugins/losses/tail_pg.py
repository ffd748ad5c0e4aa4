"""Support reverse KL plus a sampled-tail policy gradient: the LSM paper's "EMA-PG tail" support
variants (V4: student top-K + tail, V5: teacher top-K + tail), as its text defines them:

ℓ_t = Σ_{v∈S_t} π(v) (log π(v) - log q(v))                                  (head: full-softmax
      + s_t · 1[y_t ∉ S_t] · (π(y_t) / sg π(y_t)) · sg(log π(y_t) - log q(y_t))   probabilities)
s_t = sg(π(y_t) / π_b(y_t)) (π_b: the sampler's behaviour policy, top-p included), optionally
clipped at ``max_weight``.

Value: with y_t ~ π_b (and π_b > 0 wherever π > 0 outside S), E[head + tail] is the full reverse
KL(π ‖ q) at that position. Gradient: the head differentiates the full-softmax mass of S too, so
E[∇ℓ] = ∇(KL(π ‖ q) + π(S_t)), not ∇KL; ``exact_gradient: true`` adds s_t · 1[y_t ∉ S_t] · ∇log π(y_t)
(zero in value), which makes the expected gradient exactly ∇KL. tests/plugins/losses/test_tail_pg.py
checks both by enumeration. Not confirmed in a primary source: what the "EMA" of the name averages
(the formula above has no moving average; none is applied here).
Options: max_weight (> 0 or null), exact_gradient. Reads token log-probs, support logits and lse
of both models and the rollout's behaviour log-probs; output token_loss [B, T]."""

from __future__ import annotations

from typing import Annotated

import torch

from opdlm.ops.kl import support_reverse_kl
from opdlm.plugin_api import Loss
from opdlm.reads import Reads
from opdlm.registry import LOSSES
from opdlm.schema import Range
from opdlm.types import LossInputs, LossOutput, masked_mean


@LOSSES.register("tail_pg")
class TailPG(Loss):
    """Reverse KL on the support (full softmax) plus an importance-weighted sampled-tail policy gradient."""

    reads = Reads.of("token_logprob", "support_logits", "lse")

    def __init__(self, *, max_weight: Annotated[float, Range(gt=0)] | None = None, exact_gradient: bool = False) -> None:
        self.max_weight, self.exact_gradient = max_weight, exact_gradient

    def compute(self, inputs: LossInputs) -> LossOutput:
        sup = inputs.support
        head = support_reverse_kl(inputs.student.support_logprobs(), inputs.teacher.support_logprobs().detach(),
                                  sup.valid)
        lp = inputs.student.token_logprob
        sampled = inputs.rollout.targets
        outside = (~((sup.ids == sampled.unsqueeze(-1)) & sup.valid).any(-1)).to(lp.dtype)
        weight = torch.exp(lp.detach() - inputs.rollout.behaviour_logprobs.to(lp.dtype))
        if self.max_weight is not None:
            weight = weight.clamp_max(self.max_weight)
        score = torch.exp(lp - lp.detach())  # 1 in value, ∇log π(y_t) in gradient
        tail = weight * outside * score * (lp - inputs.teacher.token_logprob).detach()
        if self.exact_gradient:
            tail = tail + weight * outside * (score - 1.0)
        m = inputs.mask
        return LossOutput(token_loss=head + tail, stats={
            "tail_frac": masked_mean(outside, m).detach(),
            "tail_weight": masked_mean(weight * outside, m).detach(),
        })
