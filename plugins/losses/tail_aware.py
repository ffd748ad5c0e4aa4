"""Tail-aware top-K reverse KL (arXiv 2608.14728): reverse KL over the support plus one "tail"
class holding the mass outside it, without renormalisation:
ℓ_t = Σ_{v∈S} π log(π/q) + π_tail log(π_tail/q_tail), π_tail = 1 - Σ_{v∈S} π,
computed in log space (log π_tail = log1mexp(logsumexp_{v∈S} log π)). With S = the whole
vocabulary the tail is empty and ℓ_t is the full reverse KL. No options (the paper uses k = 16,
set it on the support). Reads Scores.support_logits and lse; output token_loss [B, T]."""

from __future__ import annotations

import torch

from opdlm.ops.kl import log1mexp, masked_sum
from opdlm.plugin_api import Loss
from opdlm.reads import Reads
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput


@LOSSES.register("tail_aware")
class TailAware(Loss):
    """Reverse KL over the support plus one tail class (no renormalisation, stable log1mexp)."""

    reads = Reads.of("support_logits", "lse")

    def __init__(self) -> None:
        pass

    def compute(self, inputs: LossInputs) -> LossOutput:
        valid = inputs.support.valid
        neg = torch.finfo(inputs.student.support_logits.dtype).min
        ls = inputs.student.support_logprobs().masked_fill(~valid, neg)
        lt = inputs.teacher.support_logprobs().detach().masked_fill(~valid, neg)
        head = masked_sum(ls.exp() * (ls - lt), valid)
        # the support mass is capped just below 1 so that an (almost) empty tail stays finite
        # and differentiable; both sides are capped alike, so such a tail adds ~0
        cap = -torch.finfo(ls.dtype).eps
        ls_tail = log1mexp(torch.logsumexp(ls, -1).clamp_max(cap))
        lt_tail = log1mexp(torch.logsumexp(lt, -1).clamp_max(cap))
        tail = ls_tail.exp() * (ls_tail - lt_tail)
        return LossOutput(token_loss=head + tail)
