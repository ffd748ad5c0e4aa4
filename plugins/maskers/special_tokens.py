"""Special-token masking of the LSM paper: in each response, drop from the loss the first
occurrence of each configured token. The tokens are given as strings and resolved through the
student tokenizer. A string the tokenizer spells in several ids masks the first occurrence of each
of those ids, as the official code does (``strict: true`` makes such a string a ConfigError
instead); a string holding characters the tokenizer does not know is always an error.
Options: tokens (list of strings; the paper's Qwen default is ["<", "think", "<|im_end|>"]);
strict (every string must be one token, default false);
teacher_tokens (list of strings resolved through the teacher tokenizer, default none): across
tokenizers, the chunk holding the first occurrence of each in the teacher's re-tokenised completion
is dropped too (e.g. a Qwen teacher's one-token "<think>" that a Llama student spells in three).
Output [B, T] bool (False at the dropped positions)."""

from __future__ import annotations

import re
import warnings

import torch
from torch import Tensor

from opdlm.errors import ConfigError, ConfigWarning
from opdlm.plugin_api import Context, Masker
from opdlm.registry import MASKERS
from opdlm.schema import did_you_mean
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

    def __init__(self, *, tokens: list[str] = ("<", "think", "<|im_end|>"), teacher_tokens: list[str] = (),
                 strict: bool = False) -> None:
        self.tokens = list(tokens)
        self.strict = strict
        self.teacher_tokens = list(teacher_tokens)
        for key, vals in (("tokens", self.tokens), ("teacher_tokens", self.teacher_tokens)):
            if not all(isinstance(t, str) and t for t in vals):
                raise ConfigError(f"{key}: must be non-empty strings, got {vals!r}")
        self.ids: Tensor | None = None
        self.teacher_ids: Tensor | None = None

    def _resolve(self, tok, strings: list[str], key: str, side: str) -> Tensor:  # noqa: ANN001 - an HF tokenizer
        ids: list[int] = []
        for t in strings:
            i = single_token_id(tok, t)
            if i is not None:
                ids.append(i)
                continue
            enc = tok(t, add_special_tokens=False)["input_ids"]
            if tok.unk_token_id is not None and tok.unk_token_id in enc:
                raise ConfigError(f"{key}: '{t}' contains characters the {side} tokenizer does not know")
            if self.strict:
                raise ConfigError(
                    f"{key}: '{t}' is not a single token of the {side} tokenizer (it encodes to {len(enc)} ids "
                    f"{enc[:8]}); list strings the tokenizer has as one token, or set strict: false to mask "
                    f"the first occurrence of each of its ids"
                )
            if re.fullmatch(r"<.+>|\[.+\]", t):  # written as a control token, but not one: a typo?
                pieces = ", ".join(repr(p) for p in tok.convert_ids_to_tokens(enc))
                known = [s for s in tok.all_special_tokens if s != t]
                warnings.warn(f"masker special_tokens: {key}: '{t}' is not one token of the {side} tokenizer, so "
                              f"its {len(enc)} pieces {pieces} are masked instead{did_you_mean(t, known)} "
                              f"(strict: true makes this an error)", ConfigWarning, stacklevel=2)
            ids.extend(int(i) for i in enc)
        return torch.tensor(sorted(set(ids)), dtype=torch.long)

    def bind(self, ctx: Context) -> None:
        self.ids = self._resolve(ctx.student_tokenizer, self.tokens, "tokens", "student")
        self.teacher_ids = self._resolve(ctx.teacher_tokenizer, self.teacher_tokens, "teacher_tokens", "teacher")

    def mask(self, rollout: Rollout, view: TeacherView) -> Tensor:
        if self.ids is None or self.teacher_ids is None:
            raise RuntimeError("special_tokens masker used before bind()")
        drop = first_occurrences(rollout.targets, self.ids.to(rollout.targets.device), rollout.response_mask)
        if len(self.teacher_ids):
            if view.teacher_targets is None or view.teacher_chunk is None:  # one tokenizer: same ids
                drop |= first_occurrences(rollout.targets, self.teacher_ids.to(drop.device), rollout.response_mask)
            else:
                t_ok = view.teacher_targets >= 0
                t_first = first_occurrences(view.teacher_targets, self.teacher_ids.to(drop.device), t_ok)
                hit_chunks = torch.where(t_first, view.teacher_chunk, torch.full_like(view.teacher_chunk, -2))
                chunk = view.chunk_ids()
                drop |= (chunk.unsqueeze(-1) == hit_chunks.unsqueeze(-2)).any(-1) & (chunk >= 0)
        return ~drop
