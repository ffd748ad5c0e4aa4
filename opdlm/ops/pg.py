"""The PPO clipped surrogate shared by the policy-gradient losses."""

from __future__ import annotations

import torch


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


def check_clip_options(clip_eps: float, dual_clip: float | None) -> None:
    """The ConfigErrors shared by the PPO-clipped losses."""
    from opdlm.registry import ConfigError

    if not clip_eps > 0:
        raise ConfigError(f"clip_eps: must be > 0, got {clip_eps}")
    if dual_clip is not None and not dual_clip > 1:
        raise ConfigError(f"dual_clip: must be > 1 (or null), got {dual_clip}")
