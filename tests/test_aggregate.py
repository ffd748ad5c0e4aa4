"""stages.opd.loss_aggregation: the engine's gradient over micro-batches equals the gradient of the
aggregation written out by hand over the whole batch (per-sequence loops), for every mode."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, demo_cfg

from opdlm.builder import build_run
from opdlm.module import OPDModule
from opdlm.ops.aggregate import AGGREGATIONS
from opdlm.types import LossInputs


class Capture(torch.optim.Optimizer):
    """Records the gradients of each step instead of stepping."""

    def __init__(self, params) -> None:  # noqa: ANN001
        super().__init__(list(params), {})
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None) -> None:  # noqa: ANN001
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])


def by_hand(token_loss: torch.Tensor, mask: torch.Tensor, mode: str, norm_length: int) -> torch.Tensor:
    seqs = [i for i in range(mask.shape[0]) if mask[i].any()]
    sums = [sum(token_loss[i, t] for t in range(mask.shape[1]) if mask[i, t]) for i in seqs]
    if mode == "token_mean":
        return sum(sums) / int(mask.sum())
    if mode == "seq_mean_token_mean":
        return sum(s / int(mask[i].sum()) for s, i in zip(sums, seqs)) / len(seqs)
    if mode == "seq_mean_token_sum":
        return sum(sums) / len(seqs)
    return sum(sums) / (len(seqs) * norm_length)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_engine_aggregation_equals_the_formula(mode):
    cfg = demo_cfg(*TINY, f"stages.opd.loss_aggregation={mode}", "stages.opd.num_micro_batches=3",
                   "stages.opd.max_grad_norm=null", "stages.opd.loss_norm_length=7", "support.k=4",
                   "trainer.precision=64-true")
    built = build_run(cfg)
    torch.manual_seed(0)
    module = OPDModule(cfg, built=built).double()
    tok = built.student.tokenizer
    ex = built.task.examples("train")[:3]
    ro = built.sampler.sample(module.student, tok, [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex],
                              ex, n=2)
    view, teacher, support, mask = module.prepare(ro)
    g = torch.Generator().manual_seed(1)
    mask = mask & (torch.rand(mask.shape, generator=g) < 0.6)  # sequences with different token counts
    mask[1] = False  # and one sequence with none (not counted as a sequence)
    assert len({int(n) for n in mask.sum(-1)}) >= 3
    opt = Capture(module.student.parameters())
    module.update(ro, view, teacher, support, mask, optimizer=opt)
    got = opt.grads[0]

    module.student.zero_grad()
    student = module.score_student(ro, support.ids)
    out = built.loss.compute(LossInputs(student=student, teacher=teacher, support=support, mask=mask, rollout=ro,
                                        view=view, old_logprob=student.token_logprob.detach()))
    by_hand(out.token_loss, mask, mode, 7).backward()
    want = [p.grad for p in module.student.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)
    assert any(float(a.abs().max()) > 0 for a in got)


def test_modes_differ_and_bad_values_fail_at_check():
    from opdlm.errors import ConfigError
    with pytest.raises(ConfigError, match=r"stages\.opd\.loss_aggregation: must be one of token_mean, seq_mean_token_mean, "):
        build_run(demo_cfg(*TINY, "stages.opd.loss_aggregation=seq"))
    with pytest.raises(ConfigError, match=r"stages\.opd\.loss_norm_length: must be >= 0"):
        build_run(demo_cfg(*TINY, "stages.opd.loss_norm_length=-1"))
    torch.manual_seed(0)
    loss = torch.rand(3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    values = {m: float(by_hand(loss, mask, m, 4)) for m in AGGREGATIONS}
    assert len(set(values.values())) == 4
