"""A weighted sum of losses, each a loss plugin node with an extra ``weight`` key, so that
"sampled-token + α·X" is a config and not code:

    loss:
      name: weighted_sum
      terms:
        - {name: sampled_token, weight: 1.0}
        - {name: forward_kl, full: false, weight: 0.5}

ℓ_t = Σ_i w_i ℓ^i_t. Options: terms (non-empty list of loss nodes; weight >= 0, default 1).
Every term sees the same support; its stats are logged as "<i>_<name>/<stat>" plus its mean loss.
It reads what its terms read together (the union of their `reads`).
Terms may read different positions (across tokenizers: chunk_pg every aligned token, first_byte
chunk starts, support losses same-token positions): the sum reads the widest set, and each term
counts only on its own positions (0 elsewhere), all over one global token mean.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from opdlm.errors import ConfigError
from opdlm.plugin_api import Context, Loss, SupportSelector
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput, masked_mean


@LOSSES.register("weighted_sum")
class WeightedSum(Loss):
    """Weighted sum of loss plugin nodes (each with a `weight`)."""

    nested_nodes = {"terms": ("loss", {"weight": 1.0})}  # --check shows each term with its defaults

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
        if not any(w > 0 for w, _, _ in self.terms):
            raise ConfigError(f"terms: every weight is 0, so the loss is 0 and OPD would train nothing; give at "
                              f"least one term a weight > 0 ({', '.join(f'terms.{i}.weight' for i in range(len(terms)))})")
        reads = self.terms[0][1].reads
        for i, (_, loss, _) in enumerate(self.terms[1:], 1):
            try:
                reads = reads.union(loss.reads)
            except ConfigError as e:
                raise ConfigError(f"terms.{i}.name: {e.detail}") from None
        self.reads = reads

    def parts(self) -> list[Loss]:
        return [loss for _, loss, _ in self.terms]

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
            x = inputs
            if loss.reads.positions != self.reads.positions and inputs.view is not None:
                x = dataclasses.replace(inputs, mask=inputs.mask & inputs.view.positions(loss.reads.positions))
            out = loss.compute(x)
            term = torch.where(x.mask, out.token_loss, torch.zeros_like(out.token_loss))
            total = w * term if total is None else total + w * term
            stats[f"{tag}/loss"] = masked_mean(out.token_loss.detach(), x.mask)
            stats.update({f"{tag}/{k}": v for k, v in out.stats.items()})
        assert total is not None
        return LossOutput(token_loss=total, stats=stats)
