"""The PPO clipped surrogate shared by the policy-gradient losses, and their base class with its
two options (``ClippedPG``: clip_eps, dual_clip)."""

from __future__ import annotations

from typing import Annotated

import torch

from opdlm.plugin_api import Loss
from opdlm.schema import Range

#: the options of the PPO-clipped losses, with their bounds (checked when the config is composed)
ClipEps = Annotated[float, Range(gt=0)]  # ratio clipped to [1 - ε, 1 + ε]
DualClip = Annotated[float, Range(gt=1)] | None  # dual clip c (> 1) for negative advantages; null: none


def ppo_token_loss(logprob: torch.Tensor, old_logprob: torch.Tensor, advantage: torch.Tensor,
                   clip_eps: float, dual_clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token clipped surrogate loss, bool mask of tokens where clipping was active)."""
    ratio = torch.exp(logprob - old_logprob)
    l1 = -advantage * ratio
    l2 = -advantage * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = torch.maximum(l1, l2)
    clipped = l2 > l1
    if dual_clip is not None:
        l3 = -advantage * dual_clip
        dual = (advantage < 0) & (loss > l3)
        loss = torch.where(advantage < 0, torch.minimum(loss, l3), loss)
        clipped = clipped | dual
    return loss, clipped


class ClippedPG(Loss):
    """Base of the losses that update through the PPO clipped surrogate (sampled-token OPD and its
    relatives): options clip_eps (the ratio is clipped to [1 - ε, 1 + ε]) and dual_clip (c > 1 caps
    the loss of a negative advantage at -c·A; null: no cap)."""

    def __init__(self, *, clip_eps: ClipEps = 0.2, dual_clip: DualClip = 3.0) -> None:
        self.clip_eps, self.dual_clip = clip_eps, dual_clip

    def clipped(self, logprob: torch.Tensor, old_logprob: torch.Tensor,
                advantage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ppo_token_loss with this loss's options."""
        return ppo_token_loss(logprob, old_logprob, advantage, self.clip_eps, self.dual_clip)
