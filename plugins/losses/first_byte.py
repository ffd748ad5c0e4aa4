"""First-byte marginal KL (cross-tokenizer variant C, docs/cross-tokenizer.md): at every chunk start both
models predict from the same byte offset, so their distributions over the next *byte* can be
compared without any vocabulary map, digits included:

P(next byte = b) = Σ_{v: bytes(v) start with b} p(v), over 257 bins (256 bytes + one bin for
control tokens and for bytes only one tokenizer can start a token with);
ℓ_t = KL(π_b ‖ q_b) = Σ_b π_b (log π_b - log q_b) (reverse, as the rest of OPD), or the forward KL.
Gradient flows through every student logit (the marginal is a sum of probabilities).
Option: direction (reverse | forward). Reads Scores.byte_logprobs; output token_loss [B, T].
"""

from __future__ import annotations

import torch

from opdlm.errors import ConfigError
from opdlm.plugin_api import Loss
from opdlm.reads import Reads
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput


@LOSSES.register("first_byte")
class FirstByte(Loss):
    """KL between the two models' next-byte marginals at chunk starts."""


    reads = Reads.of("byte_logprobs", positions="start")

    def __init__(self, *, direction: str = "reverse") -> None:
        if direction not in ("reverse", "forward"):
            raise ConfigError(f"direction: must be reverse or forward, got {direction!r}")
        self.direction = direction

    def compute(self, inputs: LossInputs) -> LossOutput:
        ls, lt = inputs.student.byte_logprobs, inputs.teacher.byte_logprobs
        assert ls is not None and lt is not None, "the engine fills byte_logprobs for first_byte"
        lt = lt.detach()
        if self.direction == "forward":
            ls, lt = lt, ls
        p = ls.exp()
        diff = torch.where(p > 0, ls - lt, torch.zeros_like(ls))  # 0·log 0 = 0; empty bins on both sides
        return LossOutput(token_loss=(p * diff).sum(-1))
