"""Sampled-token OPD (the baseline of the LSM paper): a policy gradient on the student's own
tokens with the per-token reward log q(y_t|c_t) - log π_old(y_t|c_t).

A_t = sg(log q(y_t) - log π_old(y_t)) (no baseline, no whitening); ratio = exp(log π_θ - log π_old);
L_t = max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε)), and for A < 0 additionally min(L_t, -A·c)
(dual clip, c = dual_clip). At ratio = 1 the gradient is -A_t ∇log π_θ(y_t).
Options: clip_eps (ε, > 0), dual_clip (c, > 1; null disables). Reads Scores.token_logprob only.
Output: token_loss [B, T].
"""

from __future__ import annotations

from opdlm.plugin_api import ClippedPG
from opdlm.reads import Reads
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput, masked_mean


@LOSSES.register("sampled_token")
class SampledTokenOPD(ClippedPG):
    """PPO-clipped policy gradient with reward log q - log π_old on the sampled tokens."""

    reads = Reads.of("token_logprob")


    def compute(self, inputs: LossInputs) -> LossOutput:
        adv = (inputs.teacher.token_logprob - inputs.old_logprob).detach()
        loss, clipped = self.clipped(inputs.student.token_logprob, inputs.old_logprob.detach(), adv)
        m = inputs.mask
        return LossOutput(token_loss=loss, stats={
            "clip_frac": masked_mean(clipped.float(), m).detach(),
            "advantage": masked_mean(adv, m),
        })
