"""Teacher top-K support (the LSM paper's default): at each response position the K tokens with
the highest teacher probability. Option: k (>= 1; LSM needs >= 2). Output ids [B, T, K]."""

from __future__ import annotations

import torch

from opdlm.plugin_api import Context, SupportSelector
from opdlm.registry import SUPPORTS, ConfigError
from opdlm.types import Rollout, Scores, Support


@SUPPORTS.register("teacher_topk")
class TeacherTopK(SupportSelector):
    """The K most likely tokens under the teacher at each position."""

    def __init__(self, *, k: int = 32) -> None:
        if k < 1:
            raise ConfigError(f"k: must be >= 1, got {k}")
        self.k = k
        self.teacher_topk = k

    @property
    def size(self) -> int:
        return self.k

    def bind(self, ctx: Context) -> None:
        if self.k > len(ctx.teacher_tokenizer):
            raise ConfigError(f"k: {self.k} is larger than the teacher's vocabulary ({len(ctx.teacher_tokenizer)} ids)")

    def select(self, teacher: Scores, student: Scores | None, rollout: Rollout) -> Support:
        assert teacher.topk_ids is not None and teacher.topk_ids.shape[-1] >= self.k
        ids = teacher.topk_ids[..., : self.k]
        return Support(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool))
