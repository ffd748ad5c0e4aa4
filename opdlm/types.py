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
class Outcome:
    """How one multi-turn episode ended (Rollout.outcomes)."""

    won: bool
    turns: int  # actions the student wrote
    invalid: int  # of which the game did not accept
    end: str  # 'won' | 'lost' (the game ended it) | 'turns' (turn budget) | 'context' (context budget)
    #         | 'action' (an action ran past max_new_tokens without ending its turn)
    transcript: list[tuple[str, str]] = field(default_factory=list)  # (action, observation) per turn
    replies: int = 0  # how many of those observations the conversation shows as user turns (the first ones)

    @property
    def truncated(self) -> bool:
        """Stopped by a budget before the game ended."""
        return self.end in ("turns", "context", "action")


@dataclass(frozen=True)
class Rollout:
    """Responses sampled by the student. A multi-turn rollout is one whole conversation: the
    response region holds the student's actions and the environment's observations in turn, and
    ``response_mask`` covers the action tokens only (``outcomes`` says how each episode ended)."""

    input_ids: Tensor  # [B, L] long: left-padded prompt, then the response, right-padded
    attention_mask: Tensor  # [B, L] long: 1 on real tokens (prompt and response up to EOS)
    position_ids: Tensor  # [B, L] long: positions that ignore left padding
    prompt_len: int  # P
    response_mask: Tensor  # [B, T] bool: generated tokens up to and including the first EOS (multi-turn:
    #                         every action's tokens with their end of turn; never an observation's)
    behaviour_logprobs: Tensor  # [B, T] float: log-prob of each sampled token under the sampler
    truncated: Tensor  # [B] bool: stopped by the length budget before EOS
    examples: list[Example]  # B items (each prompt repeated once per rollout)
    texts: list[str]  # B decoded responses, up to (not including) EOS (multi-turn: the transcript)
    outcomes: list[Outcome] | None = None  # multi-turn: how each episode ended (None: single-turn)

    @property
    def targets(self) -> Tensor:  # [B, T] long
        """[B, T] long: the sampled response tokens."""
        return self.input_ids[:, self.prompt_len :]

    @property
    def lengths(self) -> Tensor:  # [B] long
        """[B] long: response tokens up to and including EOS (multi-turn: action tokens)."""
        return self.response_mask.sum(-1)


@dataclass(frozen=True)
class TeacherView:
    """The same rollouts as the teacher sees them (its tokens, its prompt rendering).

    Across tokenizers the completion is cut into chunks: minimal spans of bytes that both sides
    tokenise with shared boundaries. Position sets, from widest to narrowest:
    aligned (in a chunk the teacher scores) ⊇ starts (first token of a chunk: both models predict
    from the same byte offset) ⊇ same_token (the chunk is one safe token on both sides: the two
    next-token distributions can be compared id against id). With one tokenizer (``identity``)
    every response token is its own chunk and the optional fields are None.
    """

    input_ids: Tensor  # [B, L'] long
    attention_mask: Tensor  # [B, L'] long
    position_ids: Tensor  # [B, L'] long
    pred_columns: Tensor  # [B, T] long: teacher column predicting the first teacher token of the chunk t starts (-1: none)
    targets: Tensor  # [B, T] long: that teacher token's id (-1: none)
    aligned: Tensor  # [B, T] bool: student token t lies in a chunk the teacher scores
    starts: Tensor | None = None  # [B, T] bool: t is the first student token of its chunk
    same_token: Tensor | None = None  # [B, T] bool: t's chunk is the same single safe token on both sides
    chunk: Tensor | None = None  # [B, T] long: chunk index of t within its row (-1: none)
    mismatched: Tensor | None = None  # [B, T] bool: t's chunk holds different bytes on the two sides
    invalid_utf8: Tensor | None = None  # [B, T] bool: t lies past the completion's valid UTF-8 prefix
    one_to_one: Tensor | None = None  # [B, T] bool: t's chunk is one token on both sides
    teacher_columns: Tensor | None = None  # [B, U] long: column predicting teacher completion token u (-1: pad)
    teacher_targets: Tensor | None = None  # [B, U] long: teacher completion ids (-1: pad)
    teacher_chunk: Tensor | None = None  # [B, U] long: chunk of teacher token u (-1: pad)

    def positions(self, kind: str) -> Tensor:
        """[B, T] bool: the positions a loss of ``kind`` ('token', 'start', 'chunk') may read."""
        if kind == "chunk" or (kind == "start" and self.starts is None) or (kind == "token" and self.same_token is None):
            return self.aligned
        if kind == "start":
            assert self.starts is not None
            return self.aligned & self.starts
        if kind == "token":
            assert self.same_token is not None
            return self.aligned & self.same_token
        raise ValueError(f"unknown position kind {kind!r}")

    def chunk_ids(self) -> Tensor:
        """[B, T] long chunk index per student token (each token its own chunk when there are none)."""
        if self.chunk is not None:
            return self.chunk
        B, T = self.aligned.shape
        ids = torch.arange(T, device=self.aligned.device).expand(B, T)
        return torch.where(self.aligned, ids, torch.full_like(ids, -1))


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
    chunk_logprob: Tensor | None = None  # [B, T] log-prob of the whole chunk holding token t (teacher side)
    byte_logprobs: Tensor | None = None  # [B, T, 257] log P(next byte = b); bin 256: no byte / other
    hidden: Tensor | None = None  # [B, T, H] hidden states the scores came from (teacher side; logits
    #                               [B, T, V] when the head cannot be split off): read by the lean
    #                               full-vocabulary path, which runs the head again per chunk

    def support_logprobs(self) -> Tensor:  # [B, T, K]
        """[B, T, K]: full-softmax log-probs on the support."""
        assert self.support_logits is not None
        return self.support_logits - self.lse.unsqueeze(-1)


@dataclass(frozen=True)
class Support:
    """The token set compared at each response position."""

    ids: Tensor  # [B, T, K] long student vocabulary ids (padding entries point at a valid id)
    valid: Tensor  # [B, T, K] bool: which entries belong to the set
    teacher_ids: Tensor | None = None  # [B, T, K] the same entries as teacher ids (None: the same ids)

    @property
    def size(self) -> int:
        """K, the number of entries per position."""
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
    view: TeacherView | None = None  # the teacher's view (chunks across tokenizers)


@dataclass(frozen=True)
class LossOutput:
    """What a loss returns for one micro-batch."""

    token_loss: Tensor  # [B, T] per-token loss; the engine takes the global masked mean
    stats: dict[str, Tensor] = field(default_factory=dict)  # scalar diagnostics (no grad)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask`` (0 when the mask is empty); values outside the mask are never read
    (a NaN there does not make the mean NaN)."""
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().to(x.dtype).clamp_min(1.0)


def empty_like_mask(mask: Tensor) -> Tensor:
    """An all-False bool mask of ``mask``'s shape."""
    return torch.zeros_like(mask, dtype=torch.bool)
