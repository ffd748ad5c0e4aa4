"""The memory-lean head path gives the naive path's loss values and gradients (fp32 tolerance), for
every registered loss, with several chunks (the last one partial), on one tokenizer and across two."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, demo_cfg
from test_contracts import FIXTURE_OPTIONS

from opdlm.builder import build_run
from opdlm.module import OPDModule
from opdlm.registry import LOSSES
from opdlm.types import Example

XTOK = ["teacher.tiny_tokenizer=char", "student.tiny_tokenizer=bpe", "student.tiny_vocab=320",
        "aligner.name=byte_span", "support.name=mapped_topk", "support.k=4", "maskers=[]"]


def grads_for(loss_node: dict, head: str, extra: list[str], chunk: int = 7, bf16: bool = False):
    torch.manual_seed(0)
    cfg = demo_cfg(*TINY, "support.k=4", "sampler.max_new_tokens=10", *extra,
                   f"stages.opd.head={head}", f"stages.opd.student_head_block={chunk}")
    cfg["loss"] = loss_node
    built = build_run(cfg)
    module = OPDModule(cfg, built=built)
    tok = built.student.tokenizer
    ex = built.task.examples("train")[:3]
    torch.manual_seed(1)
    ro = built.sampler.sample(module.student, tok, [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex], ex, n=2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        view, teacher, support, mask = module.prepare(ro)
        module.student.zero_grad()
        inputs, out, _ = module.loss_backward(ro, support, teacher, None, mask, view, mask.sum().float())
    g = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}
    return out.token_loss.detach(), mask, g, out.stats


def loss_nodes():
    out = []
    for name in LOSSES.names():
        node = {"name": name, **FIXTURE_OPTIONS.get("loss", {}).get(name, {})}
        out.append(pytest.param(node, id=name))
    return out


def compare(node, extra):
    l1, m1, g1, s1 = grads_for(node, "naive", extra)
    l2, m2, g2, s2 = grads_for(node, "lean", extra)
    assert torch.equal(m1, m2) and m1.sum() > 2
    torch.testing.assert_close(l2[m2], l1[m1], atol=1e-5, rtol=1e-4)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-6, rtol=1e-4, msg=k)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("node", loss_nodes())
def test_lean_equals_naive_one_tokenizer(node):
    compare(node, [])


@pytest.mark.parametrize("node", [pytest.param({"name": n}, id=n) for n in ("chunk_pg", "tail_aware", "first_byte")]
                         + [pytest.param({"name": "weighted_sum", "terms": [{"name": "chunk_pg"}, {"name": "tail_aware"},
                                                                         {"name": "first_byte"}]}, id="abc")])
def test_lean_equals_naive_across_tokenizers(node):
    compare(node, XTOK)


def test_lean_path_config_errors():
    from opdlm.errors import ConfigError
    with pytest.raises(ConfigError, match=r"stages.opd.student_head_block: must be >= 1, got 0"):
        build_run(demo_cfg(*TINY, "stages.opd.head=lean", "stages.opd.student_head_block=0"))
    with pytest.raises(ConfigError, match=r"stages.opd.head: must be naive or lean, got 'fast'"):
        build_run(demo_cfg(*TINY, "stages.opd.head=fast"))


def test_unsplittable_head_falls_back_with_a_warning():
    cfg = demo_cfg(*TINY, "stages.opd.head=lean")
    built = build_run(cfg)
    module = OPDModule(cfg, built=built)
    module.student.config.final_logit_softcapping = 30.0  # the head can no longer be split off
    tok = built.student.tokenizer
    ex = built.task.examples("train")[:2]
    ro = built.sampler.sample(module.student, tok, [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex], ex, n=1)
    view, teacher, support, mask = module.prepare(ro)
    with pytest.warns(UserWarning, match="cannot be separated from its body.*using the naive head path"):
        module.loss_backward(ro, support, teacher, None, mask, view, mask.sum().float())
    assert any(p.grad is not None for p in module.student.parameters())
    assert Example


def test_lean_equals_naive_under_bf16_autocast():
    """bf16 autocast (CPU here; the same code path as on a GPU): both paths agree to bf16 precision."""
    outs = []
    for head in ("naive", "lean"):
        _, _, g, _ = grads_for({"name": "lsm"}, head, [], bf16=True)
        flat = torch.cat([v.flatten().float() for v in g.values()])
        assert torch.isfinite(flat).all()
        outs.append(flat)
    rel = (outs[1] - outs[0]).abs().max() / outs[0].abs().max()
    assert rel < 3e-2, rel


def test_lean_equals_naive_with_the_students_own_topk_support():
    """student_topk scores the student without gradients first (chunked on the lean setting)."""
    compare({"name": "lsm"}, ["support.name=student_topk", "support.k=4"])


def test_lean_function_matches_autograd_of_head_scores_float64():
    """The Function's closed-form backward (p·(c + d[bucket]) + scatters) equals autograd through
    head_scores in float64: temperature, padding rows, bias, support logits, byte marginals."""
    from torch import nn

    from opdlm.ops.head import head_scores
    from opdlm.ops.lean import lean_scores
    g = torch.Generator().manual_seed(0)
    B, T, H, V, K = 2, 7, 6, 13, 3
    head = nn.Linear(H, V + 2).double()
    with torch.no_grad():
        head.bias[V:] = 30.0  # padding rows: must never count
    feats = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    sup = torch.randint(0, V, (B, T, K), generator=g)
    buckets = torch.randint(0, 4, (V + 2,), generator=g)
    w = [torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64),
         torch.randn(B, T, K, generator=g, dtype=torch.float64), torch.randn(B, T, 5, generator=g, dtype=torch.float64)]
    grads = []
    for fn in ("naive", "lean"):
        x = feats.clone().requires_grad_(True)
        head.zero_grad()
        kw = dict(support_ids=sup, temperature=0.8, vocab_rows=V, buckets=buckets, n_buckets=5)
        s = (lean_scores(x, head, targets, block=3, **kw) if fn == "lean" else head_scores(x, head, targets, **kw))
        bl = torch.where(torch.isfinite(s.byte_logprobs), s.byte_logprobs, torch.zeros_like(s.byte_logprobs))
        total = (w[0] * s.token_logprob).sum() + (w[1] * s.lse).sum() + (w[2] * s.support_logits).sum() + (w[3] * bl).sum()
        total.backward()
        grads.append((x.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone(), total.detach(), s.entropy.detach()))
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9)
    assert grads[0][1][V:].abs().max() == 0 and grads[1][1][V:].abs().max() == 0


@pytest.mark.parametrize("head", ["naive", "lean"])
def test_gradient_checkpointing_gives_the_same_gradients(head):
    """student.gradient_checkpointing recomputes the body's activations in backward: same gradients."""
    outs = []
    for ckpt in ("false", "true"):
        torch.manual_seed(0)
        cfg = demo_cfg(*TINY, "support.k=4", "sampler.max_new_tokens=10", f"stages.opd.head={head}",
                       f"student.gradient_checkpointing={ckpt}", "stages.opd.student_head_block=7")
        built = build_run(cfg)
        module = OPDModule(cfg, built=built)
        assert module.student.is_gradient_checkpointing == (ckpt == "true")
        module.student.train()
        tok = built.student.tokenizer
        ex = built.task.examples("train")[:3]
        torch.manual_seed(1)
        ro = built.sampler.sample(module.student, tok, [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex], ex, n=2)
        view, teacher, support, mask = module.prepare(ro)
        module.loss_backward(ro, support, teacher, None, mask, view, mask.sum().float())
        outs.append(torch.cat([p.grad.flatten() for p in module.student.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)


def test_unsplittable_head_falls_back_for_a_full_vocabulary_loss_too():
    """The fallback serves full-vocabulary losses: the teacher's logits on the whole vocabulary are
    gathered for the naive path, and the loss equals the naive head's."""
    losses = []
    for head in ("lean", "naive"):
        cfg = demo_cfg(*TINY, f"stages.opd.head={head}", "loss.name=reverse_kl")
        built = build_run(cfg)
        torch.manual_seed(0)
        module = OPDModule(cfg, built=built)
        module.student.config.final_logit_softcapping = 30.0  # the head can no longer be split off
        tok = built.student.tokenizer
        ex = built.task.examples("train")[:2]
        torch.manual_seed(1)
        ro = built.sampler.sample(module.student, tok, [tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex],
                                  ex, n=1)
        view, teacher, support, mask = module.prepare(ro)
        assert teacher.support_logits is not None and teacher.support_logits.shape[-1] == built.student.n_ids
        with pytest.warns(UserWarning) if head == "lean" else __import__("contextlib").nullcontext():
            _, out, _ = module.loss_backward(ro, support, teacher, None, mask, view, mask.sum().float())
        losses.append(out.token_loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
