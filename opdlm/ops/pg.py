"""The PPO clipped surrogate shared by the policy-gradient losses, and their two options (the losses'
base class is opdlm.plugin_api.ClippedPG)."""

from __future__ import annotations

from typing import Annotated

import torch

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
