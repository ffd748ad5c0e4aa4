"""Trust-region OPD (TrOPD, arXiv 2606.01249), as far as method.md states it: a sampled token is
trusted with probability w_t = min(q(y_t)/π_old(y_t), 1); trusted tokens get the reverse-KL policy
gradient (the sampled_token surrogate, reward log q - log π_old), the others a forward KL over the
support (the paper: teacher top-k, k = 64), not renormalised:
ℓ_t = w_t · ℓ^PG_t + (1 - w_t) · Σ_{v∈S_t} q(v) (log q(v) - log π(v)), w_t a stop-gradient.

Unconfirmed (not in a primary source we could check): whether trust is drawn per token
(Bernoulli(w_t)) or used as a weight; this plugin uses the weight, the expectation of the draw.
Also unconfirmed: whether the forward KL is renormalised on the support (here: not) and whether
the PG part is clipped (here: PPO clip and dual clip, as sampled_token).
Options: clip_eps, dual_clip. Output token_loss [B, T]."""

from __future__ import annotations

import torch

from opdlm.ops.kl import support_forward_kl
from opdlm.plugin_api import ClippedPG
from opdlm.reads import Reads
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput, masked_mean


@LOSSES.register("trust_region")
class TrustRegion(ClippedPG):
    """TrOPD: policy gradient on trusted tokens (weight min(q/π, 1)), forward KL on the rest."""

    reads = Reads.of("token_logprob", "support_logits", "lse")


    def compute(self, inputs: LossInputs) -> LossOutput:
        old = inputs.old_logprob.detach()
        adv = (inputs.teacher.token_logprob - old).detach()
        pg, clipped = self.clipped(inputs.student.token_logprob, old, adv)
        trust = torch.exp(adv.clamp_max(0.0))  # min(q/π_old, 1)
        ls = inputs.student.support_logprobs()
        lt = inputs.teacher.support_logprobs().detach()
        fkl = support_forward_kl(ls, lt, inputs.support.valid)
        return LossOutput(token_loss=trust * pg + (1.0 - trust) * fkl,
                          stats={"trust": masked_mean(trust, inputs.mask),
                                 "clip_frac": masked_mean(clipped.float(), inputs.mask).detach()})
