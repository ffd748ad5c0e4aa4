"""The sampled token alone (K = 1): the support of classic sampled-token OPD. Output ids [B, T, 1]."""

from __future__ import annotations

import torch

from opdlm.plugin_api import SupportSelector
from opdlm.registry import SUPPORTS
from opdlm.types import Rollout, Scores, Support, TeacherView


@SUPPORTS.register("sampled_token")
class SampledToken(SupportSelector):
    """Only the token the student sampled at each position."""

    def __init__(self) -> None:
        pass

    @property
    def size(self) -> int:
        return 1

    def select(self, teacher: Scores, student: Scores | None, rollout: Rollout,
               view: TeacherView | None = None) -> Support:
        ids = rollout.targets.unsqueeze(-1)
        return Support(ids=ids, valid=torch.ones_like(ids, dtype=torch.bool))
