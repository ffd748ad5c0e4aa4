"""A test loss: LSM, except at chosen OPD steps (and ranks), where its loss or only its gradient is NaN.

The step is recognised by the seed the OPD step sets before it samples (torch.initial_seed() is
opdlm.dist.step_seed(run seed, 3, rollout batch, rank)), so it is the same step after a resume, and
on every rank. Options: steps (1-based rollout batches), ranks (null: all), seed (the run's seed),
call (0: every compute of that step; k: only its k-th, e.g. the second of two mini-batches), where:
loss (the token losses are multiplied by NaN: the loss and its gradient are NaN) | gradient (the loss
is finite, its gradient is NaN)."""

from __future__ import annotations

import torch
import torch.distributed as td

from opdlm.dist import step_seed
from opdlm.plugin_api import Loss
from opdlm.registry import LOSSES
from opdlm.types import LossInputs, LossOutput


@LOSSES.register("nan_at")
class NanAt(Loss):
    def __init__(self, *, steps: list[int] | None = None, ranks: list[int] | None = None, seed: int = 0,
                 call: int = 0, where: str = "loss") -> None:
        self.inner = LOSSES.build({"name": "lsm"})
        self.reads = self.inner.reads
        self.steps, self.ranks, self.seed, self.call, self.where = list(steps or [3]), ranks, seed, call, where
        self.calls: dict[int, int] = {}  # computes per step seed

    def check_support(self, support, key):  # noqa: ANN001, ANN201
        self.inner.check_support(support, key)

    def compute(self, inputs: LossInputs) -> LossOutput:
        out = self.inner.compute(inputs)
        rank = td.get_rank() if td.is_initialized() else 0
        seeds = {step_seed(self.seed, 3, s - 1, rank) for s in self.steps}
        now = torch.initial_seed()
        self.calls[now] = self.calls.get(now, 0) + 1
        if now not in seeds or (self.ranks is not None and rank not in self.ranks):
            return out
        if self.call and self.calls[now] != self.call:
            return out
        if self.where == "gradient":  # forward: + 0; backward: 0 * d sqrt(x)/dx at 0 = 0 * inf = NaN
            lp = inputs.student.token_logprob
            return LossOutput(token_loss=out.token_loss + 0.0 * torch.sqrt(lp - lp.detach()), stats=out.stats)
        return LossOutput(token_loss=out.token_loss * float("nan"), stats=out.stats)
