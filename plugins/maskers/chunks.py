"""Cross-tokenizer chunk masker: policy on which chunks count. Tokens outside any chunk (a
character cut by the length budget, anything after a control token the teacher has no role for)
never count: the engine masks them through TeacherView.aligned. The options:
- mismatched (default false): drop chunks whose bytes differ between the sides (a normaliser such
  as Qwen's NFC rewrote them, or the teacher read characters it does not know as its unknown
  token). Off by default: the teacher still scores its own reading of that text, and a masked
  region is a place where the student escapes the loss (the cross-tokenizer demo collapsed into
  characters the teacher could not read when they were masked);
- one_to_one (default false): keep only chunks that are one token on both sides;
- max_tokens (default 0 = no limit): drop chunks longer than this many student tokens.
With one tokenizer nothing is dropped. Output [B, T] bool."""

from __future__ import annotations

import torch
from torch import Tensor

from opdlm.errors import ConfigError
from opdlm.ops.batch import per_chunk_sum
from opdlm.plugin_api import Masker
from opdlm.registry import MASKERS
from opdlm.types import Rollout, TeacherView


@MASKERS.register("chunks")
class Chunks(Masker):
    """Drops mismatched (and optionally multi-token or long) cross-tokenizer chunks."""

    def __init__(self, *, mismatched: bool = False, one_to_one: bool = False, max_tokens: int = 0) -> None:
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
            ones = torch.ones_like(view.chunk)
            counts = per_chunk_sum(ones, view.chunk, view.chunk.shape[1] + 1)
            keep &= counts.gather(1, view.chunk.clamp_min(0)) <= self.max_tokens
        return keep
