"""Student top-K support: the K tokens the student itself finds most likely at each position
(the LSM paper's "student top-K" variant). Option: k (>= 1). Output ids [B, T, K]."""

from __future__ import annotations

import torch

from opdlm.plugin_api import TopKSupport
from opdlm.registry import SUPPORTS
from opdlm.types import Rollout, Scores, Support, TeacherView


@SUPPORTS.register("student_topk")
class StudentTopK(TopKSupport):
    """The K most likely tokens under the student at each position."""

    side = "student"

    def select(self, teacher: Scores, student: Scores | None, rollout: Rollout,
               view: TeacherView | None = None) -> Support:
        assert student is not None and student.topk_ids is not None and student.topk_ids.shape[-1] >= self.k
        ids = student.topk_ids[..., : self.k]
        return Support(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool))
