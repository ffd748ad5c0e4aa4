"""Teacher nucleus support: at each position the smallest set of the teacher's most likely tokens
whose probability reaches p, with at least ``min_k`` and at most ``max_k`` tokens (variable size:
entries past the nucleus are marked invalid). Options: p in (0, 1], min_k >= 1, max_k >= min_k.
Output ids [B, T, max_k] with a validity mask."""

from __future__ import annotations

from typing import Annotated

import torch

from opdlm.errors import ConfigError
from opdlm.plugin_api import Context, SupportSelector, check_support_size
from opdlm.registry import SUPPORTS
from opdlm.schema import Range
from opdlm.types import Rollout, Scores, Support, TeacherView


@SUPPORTS.register("teacher_top_p")
class TeacherTopP(SupportSelector):
    """The teacher's nucleus (top-p) tokens, between min_k and max_k of them."""

    def __init__(self, *, p: Annotated[float, Range(gt=0, le=1)] = 0.95, min_k: int = 2, max_k: int = 64) -> None:
        if min_k < 1:
            raise ConfigError(f"min_k: must be >= 1, got {min_k}")
        if max_k < min_k:
            raise ConfigError(f"max_k: must be >= min_k ({min_k}), got {max_k}")
        self.p, self.min_k, self.max_k = p, min_k, max_k
        self.teacher_k = max_k

    @property
    def size(self) -> int:
        return self.max_k

    def bind(self, ctx: Context) -> None:
        check_support_size("max_k", self.max_k, ctx.teacher_tokenizer, "teacher")

    def select(self, teacher: Scores, student: Scores | None, rollout: Rollout,
               view: TeacherView | None = None) -> Support:
        assert teacher.topk_ids is not None and teacher.topk_logits is not None
        ids = teacher.topk_ids[..., : self.max_k]
        probs = (teacher.topk_logits[..., : self.max_k] - teacher.lse.unsqueeze(-1)).exp()
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        rank = torch.arange(ids.shape[-1], device=ids.device)
        valid = (before < self.p) | (rank < self.min_k)
        return Support(ids=ids, valid=valid)
