"""Top-K supports: at each response position the K tokens most likely under one side (``side``:
teacher or student), plus the token the student sampled when ``plus_sampled`` (appended as entry K
and marked invalid where it is already among the K, so no token counts twice). The LSM paper's
support variants are this plugin under their names:

- ``teacher_topk`` (V1, the paper's default): side teacher;
- ``student_topk_plus_sampled`` (V2): side student, plus_sampled;
- ``teacher_topk_plus_sampled`` (V3, its best single-task support): side teacher, plus_sampled;
- ``student_topk``: side student.

Options: k (>= 1, at most that side's vocabulary; LSM needs >= 2), side, plus_sampled. The engine
computes that side's own top-k. Output ids [B, T, K] (K + 1 with the sampled token).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import Tensor

from opdlm.plugin_api import Context, SupportSelector, check_support_size
from opdlm.registry import SUPPORTS
from opdlm.schema import Range
from opdlm.types import Rollout, Scores, Support, TeacherView


@SUPPORTS.register("topk")
class TopK(SupportSelector):
    """The K most likely tokens under the teacher or the student, optionally with the sampled token."""

    def __init__(self, *, k: Annotated[int, Range(ge=1)] = 32, side: Literal["teacher", "student"] = "teacher",
                 plus_sampled: bool = False) -> None:
        self.k, self.side, self.plus_sampled = k, side, plus_sampled
        if side == "teacher":
            self.teacher_k = k
        else:
            self.student_k = k

    @property
    def size(self) -> int:
        return self.k + int(self.plus_sampled)

    def bind(self, ctx: Context) -> None:
        tokenizer = ctx.teacher_tokenizer if self.side == "teacher" else ctx.student_tokenizer
        check_support_size("k", self.k, tokenizer, self.side)

    def select(self, teacher: Scores, student: Scores | None, rollout: Rollout,
               view: TeacherView | None = None) -> Support:
        scores = teacher if self.side == "teacher" else student
        assert scores is not None and scores.topk_ids is not None and scores.topk_ids.shape[-1] >= self.k
        top = scores.topk_ids[..., : self.k]
        if self.plus_sampled:
            return with_sampled(top, rollout.targets)
        return Support(ids=top, valid=torch.ones_like(top, dtype=torch.bool))


def with_sampled(top: Tensor, sampled: Tensor) -> Support:
    """The support ``top`` [B, T, K] plus the sampled token ``sampled`` [B, T] as entry K, marked
    invalid where it is already among the top K (so no token counts twice)."""
    s = sampled.unsqueeze(-1)
    inside = (top == s).any(-1, keepdim=True)
    return Support(ids=torch.cat([top, s], dim=-1),
                   valid=torch.cat([torch.ones_like(top, dtype=torch.bool), ~inside], dim=-1))


for _name, _side, _plus in (("teacher_topk", "teacher", False), ("student_topk", "student", False),
                            ("teacher_topk_plus_sampled", "teacher", True),
                            ("student_topk_plus_sampled", "student", True)):
    SUPPORTS.alias(_name, "topk", side=_side, plus_sampled=_plus)
