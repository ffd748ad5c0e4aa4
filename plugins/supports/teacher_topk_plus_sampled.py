"""Teacher top-K plus the sampled token (variant V3 of the LSM paper, its best single-task
support): S_t = topK_q(c_t) ∪ {y_t}. The sampled token is appended as entry K; when it is already
among the top K that entry is marked invalid, so no token counts twice. Option: k (>= 1).
Output ids [B, T, K + 1]."""

from __future__ import annotations

from opdlm.plugin_api import TopKSupport, with_sampled
from opdlm.registry import SUPPORTS
from opdlm.types import Rollout, Scores, Support, TeacherView


@SUPPORTS.register("teacher_topk_plus_sampled")
class TeacherTopKPlusSampled(TopKSupport):
    """The teacher's K most likely tokens and the token the student sampled."""

    side = "teacher"

    @property
    def size(self) -> int:
        return self.k + 1

    def select(self, teacher: Scores, student: Scores | None, rollout: Rollout,
               view: TeacherView | None = None) -> Support:
        assert teacher.topk_ids is not None and teacher.topk_ids.shape[-1] >= self.k
        return with_sampled(teacher.topk_ids[..., : self.k], rollout.targets)
