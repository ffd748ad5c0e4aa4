"""The γ-discounted OPD estimator ĝ_γ = Σ_t (Σ_{t'≥t} γ^{t'-t} r_{t'}) ∇log π(y_t|c_t), with the
per-token cost r_t = log π_old(y_t) - log q(y_t), as a PPO-clipped policy gradient with the
stop-gradient advantage A_t = -Σ_{t'≥t} γ^{t'-t} r_{t'}. γ = 0 is token-level OPD (the
sampled_token loss); γ = 1 is the causal, sequence-level (reward-to-go) estimator. The sum runs
inside each response and stops at its end; positions outside the loss mask add no cost.
Options: gamma in [0, 1], clip_eps, dual_clip. Reads token log-probs; output token_loss [B, T]."""

from __future__ import annotations

from typing import Annotated

import torch

from opdlm.ops.pg import ClipEps, DualClip
from opdlm.plugin_api import ClippedPG
from opdlm.reads import Reads
from opdlm.registry import LOSSES
from opdlm.schema import Range
from opdlm.types import LossInputs, LossOutput, masked_mean


def discounted_returns(cost: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = Σ_{t'≥t} γ^{t'-t} cost_{t'} along the last axis (cost already 0 outside responses)."""
    out = torch.zeros_like(cost)
    running = torch.zeros_like(cost[..., 0])
    for t in range(cost.shape[-1] - 1, -1, -1):
        running = cost[..., t] + gamma * running
        out[..., t] = running
    return out


@LOSSES.register("discounted_pg")
class DiscountedPG(ClippedPG):
    """γ-discounted OPD policy gradient (γ = 0 token-level, γ = 1 reward-to-go)."""

    reads = Reads.of("token_logprob")

    def __init__(self, *, gamma: Annotated[float, Range(ge=0, le=1)] = 0.0, clip_eps: ClipEps = 0.2,
                 dual_clip: DualClip = 3.0) -> None:
        super().__init__(clip_eps=clip_eps, dual_clip=dual_clip)
        self.gamma = gamma

    def compute(self, inputs: LossInputs) -> LossOutput:
        m = inputs.mask
        old = inputs.old_logprob.detach()
        cost = (old - inputs.teacher.token_logprob).detach() * m
        adv = -discounted_returns(cost, self.gamma)
        loss, clipped = self.clipped(inputs.student.token_logprob, old, adv)
        return LossOutput(token_loss=loss, stats={"clip_frac": masked_mean(clipped.float(), m).detach(),
                                                  "advantage": masked_mean(adv, m)})
