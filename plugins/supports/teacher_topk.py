"""Teacher top-K support (the LSM paper's default): at each response position the K tokens with
the highest teacher probability. Option: k (>= 1; LSM needs >= 2). Output ids [B, T, K]."""

from __future__ import annotations

import torch

from opdlm.plugin_api import TopKSupport
from opdlm.registry import SUPPORTS
from opdlm.types import Rollout, Scores, Support, TeacherView


@SUPPORTS.register("teacher_topk")
class TeacherTopK(TopKSupport):
    """The K most likely tokens under the teacher at each position."""

    side = "teacher"

    def select(self, teacher: Scores, student: Scores | None, rollout: Rollout,
               view: TeacherView | None = None) -> Support:
        assert teacher.topk_ids is not None and teacher.topk_ids.shape[-1] >= self.k
        ids = teacher.topk_ids[..., : self.k]
        return Support(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool))
