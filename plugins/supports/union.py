"""Union of two supports, each a support plugin node: ``{name: union, first: {name: teacher_topk,
k: 16}, second: {name: student_topk, k: 16}}``. Entries of ``second`` already in ``first`` are
marked invalid, so no token counts twice. Output ids [B, T, K1 + K2] with a validity mask."""

from __future__ import annotations

from typing import Any

import torch

from opdlm.errors import ConfigError
from opdlm.plugin_api import Context, SupportSelector
from opdlm.registry import SUPPORTS
from opdlm.types import Rollout, Scores, Support, TeacherView


@SUPPORTS.register("union")
class Union(SupportSelector):
    """The union of two support plugins (nested nodes `first` and `second`)."""

    nested_nodes = {"first": ("support", {}), "second": ("support", {})}

    def __init__(self, *, first: dict[str, Any] | None = None, second: dict[str, Any] | None = None) -> None:
        if first is None or second is None:
            raise ConfigError("first: union needs two support nodes, `first` and `second`")
        if "union" in (first.get("name"), second.get("name")):
            raise ConfigError("first: a union of unions is not supported; list the supports directly")
        self.first = SUPPORTS.build(first, "first")
        self.second = SUPPORTS.build(second, "second")
        self.teacher_k = max(self.first.teacher_k, self.second.teacher_k)
        self.student_k = max(self.first.student_k, self.second.student_k)

    @property
    def size(self) -> int:
        return self.first.size + self.second.size

    def bind(self, ctx: Context) -> None:
        self.first.bind(ctx)
        self.second.bind(ctx)

    def select(self, teacher: Scores, student: Scores | None, rollout: Rollout,
               view: TeacherView | None = None) -> Support:
        a = self.first.select(teacher, student, rollout, view)
        b = self.second.select(teacher, student, rollout, view)
        dup = ((b.ids.unsqueeze(-1) == a.ids.unsqueeze(-2)) & a.valid.unsqueeze(-2)).any(-1)
        return Support(ids=torch.cat([a.ids, b.ids], -1), valid=torch.cat([a.valid, b.valid & ~dup], -1))
