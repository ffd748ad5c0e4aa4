"""A weighted sum of losses, each a loss plugin node with an extra ``weight`` key, so that
"sampled-token + α·X" is a config and not code:

    loss:
      name: weighted_sum
      terms:
        - {name: sampled_token, weight: 1.0}
        - {name: forward_kl_topk, weight: 0.5}

ℓ_t = Σ_i w_i ℓ^i_t. Options: terms (non-empty list of loss nodes; weight >= 0, default 1).
Every term sees the same support; its stats are logged as "<i>_<name>/<stat>" plus its mean loss.
"""

from __future__ import annotations

from typing import Any

from opdlm.plugin_api import Context, Loss, SupportSelector
from opdlm.registry import LOSSES, ConfigError
from opdlm.types import LossInputs, LossOutput, masked_mean


@LOSSES.register("weighted_sum")
class WeightedSum(Loss):
    """Weighted sum of loss plugin nodes (each with a `weight`)."""

    def __init__(self, *, terms: list[dict[str, Any]] | None = None) -> None:
        if not terms:
            raise ConfigError("terms: weighted_sum needs at least one loss node")
        self.terms: list[tuple[float, Loss, str]] = []
        for i, node in enumerate(terms):
            if not isinstance(node, dict):
                raise ConfigError(f"terms.{i}: expected a loss node (a mapping with 'name'), got {node!r}")
            node = dict(node)
            weight = node.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigError(f"terms.{i}.weight: must be a number >= 0, got {weight!r}")
            if node.get("name") == "weighted_sum":
                raise ConfigError(f"terms.{i}.name: nest the terms directly instead of a weighted_sum inside one")
            loss = LOSSES.build(node, f"terms.{i}")
            self.terms.append((float(weight), loss, f"{i}_{node['name']}"))
        if len({t[1].full_vocabulary for t in self.terms}) > 1:
            raise ConfigError("terms: full-vocabulary losses (reverse_kl, forward_kl) cannot be mixed with support losses")
        self.full_vocabulary = self.terms[0][1].full_vocabulary

    def bind(self, ctx: Context) -> None:
        for _, loss, _ in self.terms:
            loss.bind(ctx)

    def check_support(self, support: SupportSelector, key: str) -> None:
        for _, loss, _ in self.terms:
            loss.check_support(support, key)

    def compute(self, inputs: LossInputs) -> LossOutput:
        total = None
        stats = {}
        for w, loss, tag in self.terms:
            out = loss.compute(inputs)
            total = w * out.token_loss if total is None else total + w * out.token_loss
            stats[f"{tag}/loss"] = masked_mean(out.token_loss.detach(), inputs.mask)
            stats.update({f"{tag}/{k}": v for k, v in out.stats.items()})
        assert total is not None
        return LossOutput(token_loss=total, stats=stats)
