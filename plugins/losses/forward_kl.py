"""Forward KL(q ‖ π), teacher in front: ℓ_t = Σ_v q(v) (log q(v) - log π(v)).

``full: true`` (default): over every id (the engine hands the loss a support of the whole
vocabulary: [B, T, V] on the naive head path, one block of positions at a time on the lean one,
through ``divergence``).
``full: false``: over the configured support S_t (registered as ``forward_kl_topk`` too); with
``renormalise: false`` (default) both sides are full-softmax probabilities, as in the entropy-aware
OPD paper, with ``renormalise: true`` both are renormalised on S_t first.
Options: full, renormalise. Reads Scores.support_logits (+ lse); output token_loss [B, T]."""

from __future__ import annotations

from torch import Tensor

from opdlm.errors import ConfigError
from opdlm.ops.kl import forward_kl_grad, masked_log_softmax, support_forward_kl
from opdlm.plugin_api import Loss
from opdlm.reads import Reads
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput


@LOSSES.register("forward_kl")
class ForwardKL(Loss):
    """Forward KL(q ‖ π) over the full vocabulary, or on the support (full: false)."""

    def __init__(self, *, full: bool = True, renormalise: bool = False) -> None:
        if full and renormalise:
            raise ConfigError("renormalise: the full-vocabulary forward KL has nothing to renormalise; "
                              "set full: false to compare on the support")
        self.full, self.renormalise = full, renormalise
        fields = ("support_logits",) if renormalise else ("support_logits", "lse")
        self.reads = Reads.of(*fields, vocabulary="full" if full else "support")

    def compute(self, inputs: LossInputs) -> LossOutput:
        valid = inputs.support.valid
        if self.renormalise:
            ls = masked_log_softmax(inputs.student.support_logits, valid)
            lt = masked_log_softmax(inputs.teacher.support_logits.detach(), valid)
        else:
            ls = inputs.student.support_logprobs()
            lt = inputs.teacher.support_logprobs().detach()
        return LossOutput(token_loss=support_forward_kl(ls, lt, valid))

    def divergence(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)

    def divergence_grad(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> tuple[Tensor, Tensor]:
        return forward_kl_grad(student_logprobs, teacher_logprobs)


LOSSES.alias("forward_kl_topk", "forward_kl", full=False)
