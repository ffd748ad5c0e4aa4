"""Student top-K support: the K tokens the student itself finds most likely at each position
(the LSM paper's "student top-K" variant). Option: k (>= 1). Output ids [B, T, K]."""

from __future__ import annotations

from opdlm.plugin_api import TopKSupport
from opdlm.registry import SUPPORTS


@SUPPORTS.register("student_topk")
class StudentTopK(TopKSupport):
    """The K most likely tokens under the student at each position."""

    side = "student"
