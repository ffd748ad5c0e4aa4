"""Teacher top-K plus the sampled token (variant V3 of the LSM paper, its best single-task
support): S_t = topK_q(c_t) ∪ {y_t}. The sampled token is appended as entry K; when it is already
among the top K that entry is marked invalid, so no token counts twice. Option: k (>= 1).
Output ids [B, T, K + 1]."""

from __future__ import annotations

from opdlm.plugin_api import TopKSupport
from opdlm.registry import SUPPORTS


@SUPPORTS.register("teacher_topk_plus_sampled")
class TeacherTopKPlusSampled(TopKSupport):
    """The teacher's K most likely tokens and the token the student sampled."""

    side = "teacher"
    plus_sampled = True
