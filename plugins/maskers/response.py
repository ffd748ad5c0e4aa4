"""Keep only generated response tokens: the prompt, padding and everything after the first EOS
are out (the EOS itself counts), and positions the teacher cannot score. Output [B, T] bool."""

from __future__ import annotations

from torch import Tensor

from opdlm.plugin_api import Masker
from opdlm.registry import MASKERS
from opdlm.types import Rollout, TeacherView


@MASKERS.register("response")
class Response(Masker):
    """Response tokens up to and including EOS; prompt, padding and the tail after EOS are masked."""

    def __init__(self) -> None:
        pass

    def mask(self, rollout: Rollout, view: TeacherView) -> Tensor:
        return rollout.response_mask & view.aligned
