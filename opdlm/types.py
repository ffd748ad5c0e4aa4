"""Frozen dataclasses passed between plugins. Shapes: B rollouts, L columns of the padded
sequence, P prompt columns (prompts are left-padded so the response starts at column P for every
row), T = L - P response positions, K support size, V vocabulary rows.

Position convention (the one place off-by-one is decided): every [B, T] or [B, T, K] tensor is
indexed by response token t = 0..T-1, i.e. column P + t of ``input_ids``; the model quantities at t
come from the logits at column P + t - 1, which predict that token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Example:
    """One task item: the prompt text, the reference answer, and (for SFT) a reference solution
    completion in the response format the verifier expects."""

    prompt: str
    answer: str
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rollout:
    """Responses sampled by the student."""

    input_ids: Tensor  # [B, L] long: left-padded prompt, then the response, right-padded
    attention_mask: Tensor  # [B, L] long: 1 on real tokens (prompt and response up to EOS)
    position_ids: Tensor  # [B, L] long: positions that ignore left padding
    prompt_len: int  # P
    response_mask: Tensor  # [B, T] bool: generated tokens up to and including the first EOS
    behaviour_logprobs: Tensor  # [B, T] float: log-prob of each sampled token under the sampler
    truncated: Tensor  # [B] bool: stopped by the length budget before EOS
    examples: list[Example]  # B items (each prompt repeated once per rollout)
    texts: list[str]  # B decoded responses, up to (not including) EOS

    @property
    def targets(self) -> Tensor:  # [B, T] long: the sampled response tokens
        return self.input_ids[:, self.prompt_len :]

    @property
    def lengths(self) -> Tensor:  # [B] long: response tokens up to and including EOS
        return self.response_mask.sum(-1)


@dataclass(frozen=True)
class TeacherView:
    """The same rollouts as the teacher sees them (its tokens, its prompt rendering)."""

    input_ids: Tensor  # [B, L'] long
    attention_mask: Tensor  # [B, L'] long
    position_ids: Tensor  # [B, L'] long
    pred_columns: Tensor  # [B, T] long: teacher column whose logits score student token t (-1: none)
    targets: Tensor  # [B, T] long: teacher id for student token t (-1: none)
    aligned: Tensor  # [B, T] bool: the teacher can score student token t


@dataclass(frozen=True)
class Scores:
    """What losses read about one model at the response positions. Logits are divided by the
    rollout temperature before any softmax. Student scores carry gradients; teacher ones do not."""

    token_logprob: Tensor  # [B, T] log p(sampled token)
    lse: Tensor  # [B, T] log-sum-exp of the logits over the vocabulary
    support_logits: Tensor | None = None  # [B, T, K] logits on Support.ids
    topk_ids: Tensor | None = None  # [B, T, k] this model's own top-k ids (when asked for)
    topk_logits: Tensor | None = None  # [B, T, k]
    entropy: Tensor | None = None  # [B, T] entropy of the full next-token distribution

    def support_logprobs(self) -> Tensor:  # [B, T, K] full-softmax log-probs on the support
        assert self.support_logits is not None
        return self.support_logits - self.lse.unsqueeze(-1)


@dataclass(frozen=True)
class Support:
    """The token set compared at each response position."""

    ids: Tensor  # [B, T, K] long vocabulary ids (padding entries point at a valid id)
    valid: Tensor  # [B, T, K] bool: which entries belong to the set

    @property
    def size(self) -> int:
        return int(self.ids.shape[-1])


@dataclass(frozen=True)
class LossInputs:
    """Everything a loss may read for one micro-batch."""

    student: Scores  # with gradients
    teacher: Scores  # without gradients
    support: Support
    old_logprob: Tensor  # [B, T] student log-prob of the sampled token when the rollouts were scored
    mask: Tensor  # [B, T] bool: positions that count
    rollout: Rollout


@dataclass(frozen=True)
class LossOutput:
    token_loss: Tensor  # [B, T] per-token loss; the engine takes the global masked mean
    stats: dict[str, Tensor] = field(default_factory=dict)  # scalar diagnostics (no grad)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask`` (0 when the mask is empty)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def empty_like_mask(mask: Tensor) -> Tensor:
    return torch.zeros_like(mask, dtype=torch.bool)
