"""Cross-tokenizer chunk masker: drops student tokens whose chunk the two sides do not hold alike.
Tokens outside any chunk (past a broken UTF-8 prefix, after an unmapped control token) never count:
the engine masks them through TeacherView.aligned. This masker adds the policy choices:
- mismatched (default true): drop chunks whose bytes differ between the sides (a normaliser such as
  Qwen's NFC rewrote the text), so the teacher is never asked about text it did not read;
- one_to_one (default false): keep only chunks that are one token on both sides;
- max_tokens (default 0 = no limit): drop chunks longer than this many student tokens.
With one tokenizer nothing is dropped. Output [B, T] bool."""

from __future__ import annotations

import torch
from torch import Tensor

from opdlm.plugin_api import Masker
from opdlm.registry import MASKERS, ConfigError
from opdlm.types import Rollout, TeacherView


@MASKERS.register("chunks")
class Chunks(Masker):
    """Drops mismatched (and optionally multi-token or long) cross-tokenizer chunks."""

    def __init__(self, *, mismatched: bool = True, one_to_one: bool = False, max_tokens: int = 0) -> None:
        if max_tokens < 0:
            raise ConfigError(f"max_tokens: must be >= 0 (0 = no limit), got {max_tokens}")
        self.drop_mismatched, self.one_to_one, self.max_tokens = mismatched, one_to_one, max_tokens

    def mask(self, rollout: Rollout, view: TeacherView) -> Tensor:
        keep = torch.ones_like(rollout.response_mask)
        if view.chunk is None:
            return keep
        if self.drop_mismatched and view.mismatched is not None:
            keep &= ~view.mismatched
        if self.one_to_one and view.one_to_one is not None:
            keep &= view.one_to_one
        if self.max_tokens:
            c = view.chunk.clamp_min(0)
            counts = torch.zeros(c.shape[0], c.shape[1] + 1, dtype=torch.long, device=c.device)
            counts.scatter_add_(1, c, (view.chunk >= 0).long())
            keep &= counts.gather(1, c) <= self.max_tokens
        return keep
