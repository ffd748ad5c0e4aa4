"""Sampled-token OPD (the baseline of the LSM paper): a policy gradient on the student's own
tokens with the per-token reward log q(y_t|c_t) - log π_old(y_t|c_t).

A_t = sg(log q(y_t) - log π_old(y_t)) (no baseline, no whitening); ratio = exp(log π_θ - log π_old);
L_t = max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε)), and for A < 0 additionally min(L_t, -A·c)
(dual clip, c = dual_clip). At ratio = 1 the gradient is -A_t ∇log π_θ(y_t).
Options: clip_eps (ε, > 0), dual_clip (c, > 1; null disables). Reads Scores.token_logprob only.
Output: token_loss [B, T].
"""

from __future__ import annotations

import torch

from opdlm.plugin_api import Loss
from opdlm.registry import LOSSES, ConfigError
from opdlm.types import LossInputs, LossOutput, masked_mean


def ppo_token_loss(logprob: torch.Tensor, old_logprob: torch.Tensor, advantage: torch.Tensor,
                   clip_eps: float, dual_clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token clipped surrogate loss, bool mask of tokens where clipping was active)."""
    ratio = torch.exp(logprob - old_logprob)
    l1 = -advantage * ratio
    l2 = -advantage * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(l1, l2)
    clipped = l2 > l1
    if dual_clip is not None:
        l3 = -advantage * dual_clip
        dual = (advantage < 0) & (loss > l3)
        loss = torch.where(advantage < 0, torch.minimum(loss, l3), loss)
        clipped = clipped | dual
    return loss, clipped


@LOSSES.register("sampled_token")
class SampledTokenOPD(Loss):
    """PPO-clipped policy gradient with reward log q - log π_old on the sampled tokens."""

    def __init__(self, *, clip_eps: float = 0.2, dual_clip: float | None = 3.0) -> None:
        if not clip_eps > 0:
            raise ConfigError(f"clip_eps: must be > 0, got {clip_eps}")
        if dual_clip is not None and not dual_clip > 1:
            raise ConfigError(f"dual_clip: must be > 1 (or null), got {dual_clip}")
        self.clip_eps, self.dual_clip = clip_eps, dual_clip

    def compute(self, inputs: LossInputs) -> LossOutput:
        adv = (inputs.teacher.token_logprob - inputs.old_logprob).detach()
        loss, clipped = ppo_token_loss(inputs.student.token_logprob, inputs.old_logprob.detach(), adv,
                                       self.clip_eps, self.dual_clip)
        m = inputs.mask
        return LossOutput(token_loss=loss, stats={
            "clip_frac": masked_mean(clipped.float(), m).detach(),
            "advantage": masked_mean(adv, m),
        })
