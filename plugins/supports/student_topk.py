"""Student top-K support: the K tokens the student itself finds most likely at each position
(the LSM paper's "student top-K" variant). Option: k (>= 1). Output ids [B, T, K]."""

from __future__ import annotations

import torch

from opdlm.plugin_api import Context, SupportSelector
from opdlm.registry import SUPPORTS, ConfigError
from opdlm.types import Rollout, Scores, Support


@SUPPORTS.register("student_topk")
class StudentTopK(SupportSelector):
    """The K most likely tokens under the student at each position."""

    def __init__(self, *, k: int = 32) -> None:
        if k < 1:
            raise ConfigError(f"k: must be >= 1, got {k}")
        self.k = k
        self.student_topk = k

    @property
    def size(self) -> int:
        return self.k

    def bind(self, ctx: Context) -> None:
        if self.k > len(ctx.student_tokenizer):
            raise ConfigError(f"k: {self.k} is larger than the student's vocabulary ({len(ctx.student_tokenizer)} ids)")

    def select(self, teacher: Scores, student: Scores | None, rollout: Rollout) -> Support:
        assert student is not None and student.topk_ids is not None and student.topk_ids.shape[-1] >= self.k
        ids = student.topk_ids[..., : self.k]
        return Support(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool))
