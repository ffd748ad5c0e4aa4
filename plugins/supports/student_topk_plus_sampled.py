"""Student top-K plus the sampled token (variant V2 of the LSM paper): S_t = topK_π(c_t) ∪ {y_t}.
The sampled token is appended as entry K; when it is already among the student's top K that entry
is marked invalid, so no token counts twice. Option: k (>= 1). Output ids [B, T, K + 1]."""

from __future__ import annotations

from opdlm.plugin_api import TopKSupport, with_sampled
from opdlm.registry import SUPPORTS
from opdlm.types import Rollout, Scores, Support, TeacherView


@SUPPORTS.register("student_topk_plus_sampled")
class StudentTopKPlusSampled(TopKSupport):
    """The student's K most likely tokens and the token it sampled."""

    side = "student"

    @property
    def size(self) -> int:
        return self.k + 1

    def select(self, teacher: Scores, student: Scores | None, rollout: Rollout,
               view: TeacherView | None = None) -> Support:
        assert student is not None and student.topk_ids is not None and student.topk_ids.shape[-1] >= self.k
        return with_sampled(student.topk_ids[..., : self.k], rollout.targets)
