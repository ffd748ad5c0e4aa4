"""A test masker for the 2-process run: rank 1 counts no token at all (its step has no token
means), rank 0 counts every one."""

from __future__ import annotations

import torch
import torch.distributed as td

from opdlm.plugin_api import Masker
from opdlm.registry import MASKERS


@MASKERS.register("nothing_on_rank_one")
class NothingOnRankOne(Masker):
    def __init__(self) -> None:
        pass

    def mask(self, rollout, view):  # noqa: ANN001, ANN201
        rank = td.get_rank() if td.is_initialized() else 0
        return torch.full_like(rollout.response_mask, rank != 1)
