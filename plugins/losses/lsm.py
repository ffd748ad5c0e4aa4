"""Local support matching (LSM): renormalised, truncated reverse KL on the support.

On the support S_t (teacher top-K by default) both sides are renormalised:
π̂ = softmax(z_S), q̂ = softmax(z^q_S); ℓ_t = Σ_{v∈S_t} π̂(v) (log π̂(v) - log q̂(v)).
The gradient reaches every student logit on S: ∂ℓ/∂z_u = π̂_u (ℓ_u - ℓ̄), ℓ_u = log π̂_u - log q̂_u,
ℓ̄ = Σ π̂ ℓ. Invalid support entries (variable-size supports) are left out on both sides.
No options. Needs a support of at least 2 tokens (K = 1 makes the loss identically zero).
Reads Scores.support_logits [B, T, K]; output token_loss [B, T].
"""

from __future__ import annotations

import torch

from opdlm.errors import ConfigError
from opdlm.plugin_api import Loss, SupportSelector
from opdlm.reads import Reads
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput, masked_mean


def renormalised_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            valid: torch.Tensor) -> torch.Tensor:
    """Σ_v π̂ (log π̂ - log q̂) over the valid entries of the last axis. Inputs [..., K]."""
    neg = torch.finfo(student_logits.dtype).min
    ls = torch.log_softmax(student_logits.masked_fill(~valid, neg), dim=-1)
    lt = torch.log_softmax(teacher_logits.masked_fill(~valid, neg), dim=-1)
    terms = ls.exp() * (ls - lt)
    return torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)


@LOSSES.register("lsm")
class LSM(Loss):
    """Renormalised truncated reverse KL on the support (teacher top-K local support matching)."""

    reads = Reads.of("support_logits", student=("lse",))  # lse: the student_support_mass diagnostic

    def __init__(self) -> None:
        pass

    def check_support(self, support: SupportSelector, key: str) -> None:
        if support.size < 2:
            opt = f"{key}.k" if hasattr(support, "k") else f"{key}.name"
            raise ConfigError(
                f"{opt}: loss 'lsm' needs a support of at least 2 tokens, but support "
                f"'{support.plugin_name}' gives {support.size} (the renormalised loss is then identically zero)"
            )

    def compute(self, inputs: LossInputs) -> LossOutput:
        s, t = inputs.student.support_logits, inputs.teacher.support_logits
        assert s is not None and t is not None
        valid = inputs.support.valid
        loss = renormalised_reverse_kl(s, t.detach(), valid)
        with torch.no_grad():
            mass = (inputs.student.support_logprobs().exp() * valid).sum(-1)
        return LossOutput(token_loss=loss, stats={"student_support_mass": masked_mean(mass, inputs.mask)})
