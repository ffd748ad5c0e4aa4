"""Teacher top-K support (the LSM paper's default): at each response position the K tokens with
the highest teacher probability. Option: k (>= 1; LSM needs >= 2). Output ids [B, T, K]."""

from __future__ import annotations

from opdlm.plugin_api import TopKSupport
from opdlm.registry import SUPPORTS


@SUPPORTS.register("teacher_topk")
class TeacherTopK(TopKSupport):
    """The K most likely tokens under the teacher at each position."""

    side = "teacher"
