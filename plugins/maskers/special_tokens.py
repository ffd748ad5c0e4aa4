"""Special-token masking of the LSM paper: in each response, drop from the loss the first
occurrence of each configured token. The tokens are given as strings and resolved through the
student tokenizer; each must encode to exactly one id (else a ConfigError before training).
Option: tokens (list of strings; the paper's Qwen default is ["<", "think", "<|im_end|>"]).
Output [B, T] bool (False at the dropped positions)."""

from __future__ import annotations

import torch
from torch import Tensor

from opdlm.plugin_api import Context, Masker
from opdlm.registry import MASKERS, ConfigError
from opdlm.types import Rollout, TeacherView


def single_token_id(tokenizer, text: str) -> int | None:  # noqa: ANN001 - an HF tokenizer
    """The id of ``text`` if the tokenizer spells it as one token (as plain text or as an added or
    special token), else None."""
    vocab = tokenizer.get_vocab()
    if text in vocab:
        return int(vocab[text])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
        return int(ids[0])
    return None


def first_occurrences(targets: Tensor, ids: Tensor, allowed: Tensor) -> Tensor:
    """[B, T] bool: True at the first position (within ``allowed``) where each of ``ids`` occurs."""
    out = torch.zeros_like(targets, dtype=torch.bool)
    for tok in ids.tolist():
        hit = (targets == tok) & allowed
        first = hit & (hit.long().cumsum(-1) == 1)
        out |= first
    return out


@MASKERS.register("special_tokens")
class SpecialTokens(Masker):
    """Drops the first occurrence per response of each configured token string."""

    def __init__(self, *, tokens: list[str] | None = None) -> None:
        self.tokens = list(tokens) if tokens is not None else ["<", "think", "<|im_end|>"]
        if not all(isinstance(t, str) and t for t in self.tokens):
            raise ConfigError(f"tokens: must be non-empty strings, got {self.tokens!r}")
        self.ids: Tensor | None = None

    def bind(self, ctx: Context) -> None:
        ids = []
        for t in self.tokens:
            i = single_token_id(ctx.student_tokenizer, t)
            if i is None:
                tok = ctx.student_tokenizer
                enc = tok(t, add_special_tokens=False)["input_ids"]
                how = ("contains characters it does not know" if tok.unk_token_id in enc
                       else f"encodes to {len(enc)} ids {enc[:8]}")
                raise ConfigError(
                    f"tokens: '{t}' is not a single token of the student tokenizer (it {how}); "
                    f"list strings the tokenizer has as one token"
                )
            ids.append(i)
        self.ids = torch.tensor(sorted(set(ids)), dtype=torch.long)

    def mask(self, rollout: Rollout, view: TeacherView) -> Tensor:
        if self.ids is None:
            raise RuntimeError("special_tokens masker used before bind()")
        drop = first_occurrences(rollout.targets, self.ids.to(rollout.targets.device), rollout.response_mask)
        return ~drop
