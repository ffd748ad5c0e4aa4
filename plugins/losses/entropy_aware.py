"""Entropy-aware OPD (arXiv 2603.07079): sampled-token OPD plus, where the teacher is uncertain,
a forward KL over the support (teacher top-k in the paper, k = 16), not renormalised:
ℓ_t = ℓ^PG_t + α · 1[H(q_t) > τ] · Σ_{v∈S_t} q(v) (log q(v) - log π(v)).
ℓ^PG is the sampled_token loss (PPO clip, dual clip). Options: alpha (>= 0), tau (>= 0, nats),
clip_eps, dual_clip. Reads token log-probs, teacher entropy, support logits; output [B, T]."""

from __future__ import annotations

from typing import Annotated

from opdlm.ops.kl import support_forward_kl
from opdlm.ops.pg import ClipEps, DualClip
from opdlm.plugin_api import ClippedPG
from opdlm.reads import Reads
from opdlm.registry import LOSSES
from opdlm.schema import Range
from opdlm.types import LossInputs, LossOutput, masked_mean


@LOSSES.register("entropy_aware")
class EntropyAware(ClippedPG):
    """Sampled-token OPD + alpha * 1[H(teacher) > tau] * forward KL on the support."""

    reads = Reads.of("token_logprob", "support_logits", "lse", teacher=("entropy",))

    def __init__(self, *, alpha: Annotated[float, Range(ge=0)] = 1.0, tau: Annotated[float, Range(ge=0)] = 0.8,
                 clip_eps: ClipEps = 0.2, dual_clip: DualClip = 3.0) -> None:
        super().__init__(clip_eps=clip_eps, dual_clip=dual_clip)
        self.alpha, self.tau = alpha, tau

    def compute(self, inputs: LossInputs) -> LossOutput:
        old = inputs.old_logprob.detach()
        adv = (inputs.teacher.token_logprob - old).detach()
        pg, clipped = self.clipped(inputs.student.token_logprob, old, adv)
        ls = inputs.student.support_logprobs()
        lt = inputs.teacher.support_logprobs().detach()
        fkl = support_forward_kl(ls, lt, inputs.support.valid)
        gate = (inputs.teacher.entropy > self.tau).to(fkl.dtype)
        stats = {"clip_frac": masked_mean(clipped.float(), inputs.mask).detach(),
                 "gated_frac": masked_mean(gate, inputs.mask).detach()}
        return LossOutput(token_loss=pg + self.alpha * gate * fkl, stats=stats)
