"""The one-pass full-vocabulary loss (opdlm.ops.fullvocab): its value, per-position divergences and
gradients against autograd through the plain formula in float64; the closed-form gradients of the
built-in divergences against autograd; and, inside a step, the teacher's head runs once per block
(in the loss's pass, none in the teacher's phase) and gives the plain forward's numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, demo_cfg
from torch import nn

from opdlm.builder import build_run
from opdlm.module import OPDModule
from opdlm.ops.fullvocab import full_vocab_loss
from opdlm.plugin_api import Loss
from opdlm.reads import Reads
from opdlm.registry import LOSSES


class SquaredGap(Loss):
    """A full-vocabulary loss with no closed-form gradient (the default, autograd, is used)."""

    reads = Reads.of("support_logits", vocabulary="full")

    def divergence(self, student_logprobs, teacher_logprobs):
        return ((student_logprobs.exp() - teacher_logprobs.exp()) ** 2).sum(-1) * 10.0


LOSS_CASES = [pytest.param(lambda: LOSSES.build({"name": "reverse_kl"}), id="reverse_kl"),
              pytest.param(lambda: LOSSES.build({"name": "forward_kl"}), id="forward_kl"),
              pytest.param(lambda: LOSSES.build({"name": "jsd", "beta": 0.3, "full": True}), id="jsd0.3"),
              pytest.param(SquaredGap, id="default_autograd")]


@pytest.mark.parametrize("make_loss", LOSS_CASES)
def test_one_pass_equals_autograd_of_the_plain_formula_float64(make_loss):
    loss = make_loss()
    g = torch.Generator().manual_seed(0)
    B, T, H, Ht, V, Vt = 2, 5, 6, 4, 11, 13  # teacher rows past the student's (its padding rows) are left out
    head = nn.Linear(H, V + 2).double()  # two padding rows past the tokenizer's V
    t_head = nn.Linear(Ht, Vt + 1).double()
    feats = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    t_feats = torch.randn(B, T, Ht, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    scale = torch.rand(B, T, generator=g, dtype=torch.float64)
    scale[0, 1:3] = 0.0  # positions outside the loss
    temp = 0.7
    total, vals, student, teacher = full_vocab_loss(feats, head, t_feats, t_head, targets, loss, scale,
                                                    student_rows=V, teacher_rows=Vt, temperature=temp, block=3)
    total.backward()
    got = {"feats": feats.grad.clone(), "weight": head.weight.grad.clone(), "bias": head.bias.grad.clone()}
    feats.grad = None
    head.zero_grad(set_to_none=True)
    zs = head(feats)[..., :V] / temp
    ls = torch.log_softmax(zs, -1)
    zt = (t_head(t_feats)[..., :Vt] / temp).detach()
    lt_all = torch.log_softmax(zt, -1)
    ref_vals = loss.divergence(ls.reshape(-1, V), lt_all[..., :V].reshape(-1, V)).reshape(B, T)
    ref_total = (ref_vals * scale).sum()
    ref_total.backward()
    torch.testing.assert_close(total, ref_total.detach())
    on = scale > 0
    torch.testing.assert_close(vals[on], ref_vals.detach()[on])
    assert torch.equal(vals[~on], torch.zeros_like(vals[~on]))
    torch.testing.assert_close(got["feats"], feats.grad)
    torch.testing.assert_close(got["weight"], head.weight.grad)
    torch.testing.assert_close(got["bias"], head.bias.grad)
    assert torch.equal(got["weight"][V:], torch.zeros_like(got["weight"][V:]))  # padding rows: no gradient
    for scores, lp, z in ((student, ls.detach(), zs.detach()), (teacher, lt_all, zt)):
        torch.testing.assert_close(scores.lse, torch.logsumexp(z, -1))
        torch.testing.assert_close(scores.token_logprob, lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
        torch.testing.assert_close(scores.entropy, -(lp.exp() * lp).sum(-1))


@pytest.mark.parametrize("name,options", [("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"beta": 0.0}),
                                          ("jsd", {"beta": 0.25}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 1.0})])
def test_closed_form_gradients_equal_autograd_of_divergence(name, options):
    loss = LOSSES.build({"name": name, **options, **({"full": True} if name == "jsd" else {})})
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(6, 40, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(6, 40, generator=g, dtype=torch.float64) * 3
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    want_val, want_grad = Loss.divergence_grad(loss, ls.clone(), lt.clone())  # autograd of divergence()
    assert type(loss).divergence_grad is not Loss.divergence_grad  # a closed form of its own
    val, grad = loss.divergence_grad(ls.clone(), lt.clone())
    torch.testing.assert_close(val, want_val)
    torch.testing.assert_close(grad, want_grad)
    torch.testing.assert_close(val, loss.divergence(ls, lt))


def test_the_teachers_head_runs_once_per_block_in_the_losss_pass(monkeypatch):
    import opdlm.ops.fullvocab as fv
    import opdlm.ops.head as head_ops
    torch.manual_seed(0)
    cfg = demo_cfg(*TINY, "sampler.max_new_tokens=10", "sampler.n=2", "loss.name=reverse_kl", "stages.opd.head=lean",
                   "stages.opd.student_head_block=4")
    built = build_run(cfg)
    module = OPDModule(cfg, built=built)
    tok = built.student.tokenizer
    ex = built.task.examples("train")[:3]
    ro = built.sampler.sample(module.student, tok, [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex], ex)
    t_head = module.teacher.get_output_embeddings()
    passes, weights = [], []
    real_logits, real_linear = head_ops._logits, fv.linear_logits
    monkeypatch.setattr(head_ops, "_logits", lambda *a, **k: passes.append(1) or real_logits(*a, **k))
    monkeypatch.setattr(fv, "linear_logits", lambda h, w, *a, **k: weights.append(w) or real_linear(h, w, *a, **k))
    view, teacher, support, mask = module.prepare(ro)
    assert passes == [] and torch.isnan(teacher.lse).all()  # the teacher's phase ran its body only
    opt = torch.optim.SGD(module.student.parameters(), lr=0.0)
    module.update(ro, view, teacher, support, mask, optimizer=opt)
    n = ro.targets.numel()
    blocks = -(-n // 4)
    assert sum(w.data_ptr() == t_head.weight.data_ptr() for w in weights) == blocks  # once per block, in the loss's pass
    assert passes == []
    with torch.no_grad():  # the teacher's numbers the pass wrote back equal its plain forward's
        z = module.teacher(input_ids=view.input_ids, attention_mask=view.attention_mask,
                           position_ids=view.position_ids).logits
        z = z.gather(1, view.pred_columns.clamp_min(0).unsqueeze(-1).expand(-1, -1, z.shape[-1]))
        z = z[..., : module.run.teacher.n_ids] / module.scorer().temperature
    lp = torch.log_softmax(z, -1)
    torch.testing.assert_close(teacher.lse, torch.logsumexp(z, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.token_logprob, lp.gather(-1, view.targets.clamp_min(0).unsqueeze(-1)).squeeze(-1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.entropy, -(lp.exp() * lp).sum(-1), atol=1e-5, rtol=1e-5)
