"""Student top-K plus the sampled token (variant V2 of the LSM paper): S_t = topK_π(c_t) ∪ {y_t}.
The sampled token is appended as entry K; when it is already among the student's top K that entry
is marked invalid, so no token counts twice. Option: k (>= 1). Output ids [B, T, K + 1]."""

from __future__ import annotations

from opdlm.plugin_api import TopKSupport
from opdlm.registry import SUPPORTS


@SUPPORTS.register("student_topk_plus_sampled")
class StudentTopKPlusSampled(TopKSupport):
    """The student's K most likely tokens and the token it sampled."""

    side = "student"
    plus_sampled = True
