"""The cross-tokenizer path end to end on real tiny models: a character-level teacher and a
byte-level BPE student (digits grouped as in Llama), the byte_span aligner, and the losses that
read chunks. References are independent forwards of each model on its own tokenisation."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import TINY, demo_cfg
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opdlm.builder import build_run
from opdlm.models import render_prompt
from opdlm.module import OPDModule
from opdlm.registry import LOSSES
from opdlm.types import Example, LossInputs, Rollout

XTOK = ["teacher.tiny_tokenizer=char", "student.tiny_tokenizer=bpe", "student.tiny_vocab=320",
        "aligner.name=byte_span", "support.name=mapped_topk", "support.k=4",
        "maskers=[{name: chunks}]"]


def forced_rollout(tok, examples: list[Example], completions: list[list[int]]) -> Rollout:
    """A Rollout of given completions (teacher forcing): left-padded prompts, right-padded answers."""
    prompts = [render_prompt(tok, ex.prompt, False) for ex in examples]
    P = max(map(len, prompts))
    T = max(map(len, completions))
    B = len(prompts)
    pad = tok.pad_token_id
    ids = torch.full((B, P + T), pad, dtype=torch.long)
    attn = torch.zeros(B, P + T, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, P - len(p) : P] = torch.tensor(p)
        ids[b, P : P + len(c)] = torch.tensor(c)
        attn[b, P - len(p) : P + len(c)] = 1
        resp[b, : len(c)] = True
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return Rollout(input_ids=ids, attention_mask=attn, position_ids=pos, prompt_len=P, response_mask=resp,
                   behaviour_logprobs=torch.zeros(B, T), truncated=torch.zeros(B, dtype=torch.bool),
                   examples=list(examples), texts=[tok.decode(c, skip_special_tokens=True) for c in completions])


def solutions(built, n: int = 6) -> tuple[list[Example], list[list[int]]]:
    tok = built.student.tokenizer
    ex = built.task.examples("train")[:n]
    comp = [tok(e.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for e in ex]
    return ex, comp


def seq_logprob(model, ids: list[int], n_prompt: int) -> float:
    """Σ log p(ids[t] | ids[:t]) over the completion: one plain forward."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
    tgt = x[0, 1:]
    return float(logp.gather(1, tgt[:, None]).squeeze(1)[n_prompt - 1 :].sum())


@pytest.fixture(scope="module")
def bytes_bpe(tmp_path_factory):
    """A byte-level BPE student tokenizer with all 256 bytes (it can write broken UTF-8 and
    characters the task never uses), saved as a tokenizer folder."""
    from opdlm.models import bpe_tokenizer
    from opdlm.registry import TASKS
    task = TASKS.build(demo_cfg(*TINY)["task"], "task")
    texts = [e.prompt + e.solution for e in task.examples("train")]
    tok = bpe_tokenizer(texts, 320, 3, all_bytes=True)
    d = tmp_path_factory.mktemp("bpe")
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def xworld(bytes_bpe):
    torch.manual_seed(0)
    cfg = demo_cfg(*TINY, *XTOK, "loss.name=chunk_pg", f"student.tokenizer_path={bytes_bpe}")
    built = build_run(cfg)
    return cfg, built, OPDModule(cfg, built=built)


def test_the_two_tokenizers_really_differ(xworld):
    _, built, _ = xworld
    s, t = built.student.tokenizer, built.teacher.tokenizer
    assert len(s) > len(t) and s.eos_token != t.eos_token
    text = " ".join(e.solution for e in built.task.examples("train")[:50])
    s_pieces = s.convert_ids_to_tokens(s(text, add_special_tokens=False)["input_ids"])
    t_pieces = t.convert_ids_to_tokens(t(text, add_special_tokens=False)["input_ids"])
    assert any(p.isdigit() and len(p) > 1 for p in s_pieces), "the student groups digits"
    assert max(len(p) for p in s_pieces if p.isdigit()) <= 3
    assert not any(p.isdigit() and len(p) > 1 for p in t_pieces), "the teacher splits every digit"


def test_chunk_log_ratios_sum_to_the_sequence_log_ratio(xworld):
    _, built, module = xworld
    ex, comp = solutions(built)
    ro = forced_rollout(built.student.tokenizer, ex, comp)
    view, teacher, _, _ = module.prepare(ro)
    assert view.aligned.equal(ro.response_mask), "reference solutions align completely"
    student = module.score_student(ro, None)
    starts = view.positions("start")
    st, tt = built.student.tokenizer, built.teacher.tokenizer
    multi = 0
    for b in range(len(ex)):
        ch = view.chunk[b][ro.response_mask[b]]
        tc = view.teacher_chunk[b][view.teacher_chunk[b] >= 0]
        multi += int((torch.bincount(tc) > 1).sum())
        # per chunk: the teacher's chunk log-prob minus the student's (Σ of its tokens)
        lp_t = teacher.chunk_logprob[b][starts[b]].double()
        lp_s = torch.zeros(int(ch.max()) + 1, dtype=torch.float64).index_add_(
            0, ch, student.token_logprob[b][ro.response_mask[b]].double().detach())
        chunk_sum = float((lp_t - lp_s).sum())
        # independent: each model on its own tokenisation of prompt + completion
        sp = render_prompt(st, ex[b].prompt, False)
        tp = render_prompt(tt, ex[b].prompt, False)
        t_comp = tt(ex[b].solution, add_special_tokens=False)["input_ids"] + [tt.eos_token_id]
        ref = seq_logprob(module.teacher, tp + t_comp, len(tp)) - seq_logprob(module.student, sp + comp[b], len(sp))
        assert chunk_sum == pytest.approx(ref, abs=1e-3)
    assert multi > 0, "some chunks hold several teacher tokens (digit groups, merged tags)"
    assert (view.positions("token") != view.positions("start")).any(), "digit chunks are not token-comparable"


def permuted_copy(tok, model, seed: int = 0):
    """The same model behind a tokenizer whose ids are a permutation of ``tok``'s (and whose end
    of turn is spelled differently): a teacher that is the student in disguise."""
    vocab = tok.get_vocab()
    n = len(vocab)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    eos = tok.eos_token
    new_vocab = {("<|end|>" if k == eos else k): int(perm[v]) for k, v in vocab.items()}
    w = Tokenizer(models.WordLevel(vocab=new_vocab, unk_token="<unk>"))
    w.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    w.decoder = decoders.Fuse()
    specials = [k for k in new_vocab if k in ("<pad>", "<|end|>", "<unk>")]
    added = [k for k in new_vocab if k.startswith("<") and len(k) > 1 and k not in specials]
    fast = PreTrainedTokenizerFast(tokenizer_object=w, pad_token="<pad>", eos_token="<|end|>", unk_token="<unk>")
    fast.add_tokens(added, special_tokens=False)
    fast.padding_side = "left"
    assert fast.get_vocab() == new_vocab
    teacher = copy.deepcopy(model)
    emb = teacher.get_input_embeddings().weight
    with torch.no_grad():
        new = torch.empty_like(emb)
        new[perm] = emb
        emb.copy_(new)
        head = teacher.get_output_embeddings()
        if head.weight.data_ptr() != emb.data_ptr():
            hw = torch.empty_like(head.weight)
            hw[perm] = head.weight
            head.weight.copy_(hw)
    return fast, teacher


def test_off_by_one_guard_teacher_is_the_student_behind_another_tokenizer(tmp_path):
    torch.manual_seed(1)
    cfg = demo_cfg(*TINY, "aligner.name=byte_span", "support.name=mapped_topk", "support.k=4",
                   "maskers=[]", "loss.name=chunk_pg")
    built = build_run(cfg)
    st = built.student.tokenizer
    module = OPDModule(cfg, built=built)
    ttok, teacher = permuted_copy(st, module.student)
    cfg2 = dict(cfg)
    plan2 = build_run(cfg2)
    plan2.teacher.tokenizer = ttok
    plan2.ctx.teacher_tokenizer = ttok
    plan2.aligner.bind(plan2.ctx)
    plan2.support.bind(plan2.ctx)
    module2 = OPDModule(cfg2, built=plan2, student=module.student, teacher=teacher)
    ex = built.task.examples("train")[:4]
    prompts = [render_prompt(st, e.prompt, False) for e in ex]
    ro = built.sampler.sample(module.student, st, prompts, ex, n=2)
    view, t_scores, _, _ = module2.prepare(ro)
    s_scores = module2.score_student(ro, None)
    same = view.positions("token")
    assert same.sum() > 10
    assert (view.targets[same] != ro.targets[same]).any(), "the teacher reads other ids"
    torch.testing.assert_close(t_scores.token_logprob[same], s_scores.token_logprob[same].detach(), atol=1e-5, rtol=0)
    p_t = t_scores.token_logprob[same].exp().mean()
    p_s = s_scores.token_logprob[same].detach().exp().mean()
    assert float(p_t) == pytest.approx(float(p_s), abs=1e-5)
    # the chunk path agrees too: every chunk is one character on both sides
    al = view.aligned
    torch.testing.assert_close(t_scores.chunk_logprob[al], s_scores.token_logprob[al].detach(), atol=1e-5, rtol=0)


LOSS_CASES = [
    ("sampled_token", {}), ("chunk_pg", {}), ("lsm", {}), ("tail_aware", {}), ("first_byte", {}),
    ("weighted_sum", {"terms": [{"name": "chunk_pg"}, {"name": "tail_aware"}, {"name": "first_byte", "weight": 0.5}]}),
]


@pytest.mark.parametrize("loss,opts", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_byte_span_with_one_tokenizer_gives_the_identity_losses(loss, opts):
    """Same tokenizer on both sides: byte_span's losses and gradients equal identity's."""
    outs = []
    for aligner in ("identity", "byte_span"):
        torch.manual_seed(2)
        cfg = demo_cfg(*TINY, f"aligner.name={aligner}", "support.name=mapped_topk", "support.k=4",
                       "maskers=[]", f"loss.name={loss}")
        cfg["loss"] = {"name": loss, **opts}
        built = build_run(cfg)
        module = OPDModule(cfg, built=built)
        ex, comp = solutions(built, 5)
        ro = forced_rollout(built.student.tokenizer, ex, comp)
        view, teacher, support, mask = module.prepare(ro)
        student = module.score_student(ro, support.ids)
        out = built.loss.compute(LossInputs(student=student, teacher=teacher, support=support,
                                           old_logprob=student.token_logprob.detach() - 0.1, mask=mask,
                                           rollout=ro, view=view))
        total = (out.token_loss * mask).sum() / mask.sum()
        module.student.zero_grad()
        total.backward()
        grad = torch.cat([p.grad.flatten() for p in module.student.parameters() if p.grad is not None])
        outs.append((mask, out.token_loss.detach(), grad))
    (m1, l1, g1), (m2, l2, g2) = outs
    assert torch.equal(m1, m2) and m1.sum() > 20
    torch.testing.assert_close(l1[m1], l2[m2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_chunk_pg_gradient_is_the_chunk_advantage_times_the_chunk_score(xworld):
    """∇ Σ_t ℓ_t = -Σ_c A_c ∇ lp_S(c) at ratio 1, with A_c = lp_T(c) - lp_S(c) (brute force per chunk)."""
    _, built, module = xworld
    ex, comp = solutions(built, 4)
    ro = forced_rollout(built.student.tokenizer, ex, comp)
    view, teacher, support, mask = module.prepare(ro)
    loss = LOSSES.build({"name": "chunk_pg"})
    student = module.score_student(ro, None)
    out = loss.compute(LossInputs(student=student, teacher=teacher, support=support,
                                  old_logprob=student.token_logprob.detach(), mask=mask, rollout=ro, view=view))
    params = [p for p in module.student.parameters() if p.requires_grad]
    g = torch.autograd.grad((out.token_loss * mask).sum(), params, retain_graph=True)
    ref = 0.0
    lp = student.token_logprob
    for b in range(lp.shape[0]):
        ch = view.chunk[b]
        for c in range(int(ch.max()) + 1):
            toks = (ch == c) & mask[b]
            if not toks.any():
                continue
            lp_s = lp[b][ch == c].sum()
            a = float(teacher.chunk_logprob[b][ch == c][0]) - float(lp_s.detach())
            ref = ref - a * lp[b][toks].sum()
    g_ref = torch.autograd.grad(ref, params)
    for x, y in zip(g, g_ref):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_first_byte_marginal_matches_a_python_sum(xworld):
    _, built, module = xworld
    ex, comp = solutions(built, 2)
    ro = forced_rollout(built.student.tokenizer, ex, comp)
    s = module.score_student(ro, None, first_byte=True)
    from opdlm.xtok.tables import tables_for
    tb = tables_for(built.ctx)
    cols = torch.arange(ro.prompt_len - 1, ro.input_ids.shape[1] - 1)
    with torch.no_grad():
        logits = module.student(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                                position_ids=ro.position_ids).logits[:, cols].double()
    probs = torch.softmax(logits[..., : built.student.n_ids], -1)
    for b, t in [(0, 0), (0, 3), (1, 5)]:
        ref = [0.0] * 257
        for v in range(built.student.n_ids):
            ref[int(tb.s_bins[v])] += float(probs[b, t, v])
        got = s.byte_logprobs[b, t].double().exp()
        torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=1e-4)
    assert len(set(tb.s_bins.tolist())) > 10


def test_mapped_topk_maps_by_bytes_and_adds_the_sampled_token(xworld):
    _, built, module = xworld
    ex, comp = solutions(built, 3)
    ro = forced_rollout(built.student.tokenizer, ex, comp)
    view, teacher, support, _ = module.prepare(ro)
    sb = built.student.tokenizer.convert_ids_to_tokens(list(range(len(built.student.tokenizer))))
    tb = built.teacher.tokenizer
    from opdlm.xtok.tables import byte_decoder
    dec = byte_decoder()
    s_bytes = {i: bytes(dec[c] for c in p) for i, p in enumerate(sb) if p not in ("<pad>", "<|eot_id|>")}
    from opdlm.xtok.tables import tables_for
    safe = tables_for(built.ctx).safe
    same = view.positions("token")
    assert same.any() and not same.all()
    for b, t in same.nonzero().tolist()[:20]:
        tids = teacher.topk_ids[b, t, :4].tolist()
        want = []
        for tid in tids:
            piece = tb.convert_ids_to_tokens(tid)
            hit = [i for i, x in s_bytes.items() if x == piece.encode()] if tid not in tb.all_special_ids else \
                ([built.student.tokenizer.eos_token_id] if tid == tb.eos_token_id else [])
            if hit and safe[min(hit)] and min(hit) not in want:  # digits are not mapped (tail class)
                want.append(min(hit))
        sampled = int(ro.targets[b, t])
        if sampled not in want:
            want.append(sampled)
        got = support.ids[b, t][support.valid[b, t]].tolist()
        assert sorted(got) == sorted(want)
        # the teacher ids of the entries hold the same bytes
        for sid, tid in zip(support.ids[b, t][support.valid[b, t]].tolist(),
                            support.teacher_ids[b, t][support.valid[b, t]].tolist()):
            if sid != built.student.tokenizer.eos_token_id:
                assert s_bytes[sid] == tb.convert_ids_to_tokens(tid).encode()
    off = ~same & ro.response_mask
    assert not support.valid[off].any(), "no support outside same-token positions"


def test_alignment_metrics_count_broken_utf8(xworld):
    from opdlm.ops.batch import alignment_stats
    _, built, module = xworld
    st = built.student.tokenizer
    ex, comp = solutions(built, 2)
    cut = st.convert_tokens_to_ids("Ã")  # byte 0xC3: the first byte of a two-byte character
    comp[1] = comp[1][:5] + [cut]
    ro = forced_rollout(st, ex, comp)
    view, _, _, mask = module.prepare(ro)
    stats = alignment_stats(ro, view)
    n = int(ro.response_mask.sum())
    assert float(stats["xtok/invalid_utf8_frac"]) == pytest.approx(1 / n)
    assert float(stats["xtok/unaligned_frac"]) == pytest.approx(1 / n)
    assert not mask[1, 5] and mask[1, :5].all()
    chunks = int(view.positions("start").sum())
    assert float(stats["xtok/mean_chunk_len"]) == pytest.approx((n - 1) / chunks)
    assert 0 < float(stats["xtok/topk_eligible_frac"]) < float(stats["xtok/one_to_one_frac"]) <= 1


def test_characters_the_teacher_cannot_read_are_scored_as_its_unknown_token(xworld):
    _, built, module = xworld
    st, tt = built.student.tokenizer, built.teacher.tokenizer
    ex, comp = solutions(built, 2)
    y = st.convert_tokens_to_ids("Y")  # a byte the task never uses: the character teacher has no "Y"
    bad = st.convert_tokens_to_ids("Ã")  # a lone lead byte: invalid UTF-8 inside the text
    comp[0] = comp[0][:3] + [y] + comp[0][3:]
    comp[1] = comp[1][:4] + [bad] + comp[1][4:]
    ro = forced_rollout(st, ex, comp)
    view, teacher, _, mask = module.prepare(ro)
    assert view.aligned.equal(ro.response_mask), "nothing is left unaligned (no place to hide)"
    assert view.mismatched[0].nonzero().flatten().tolist() == [3]
    assert view.mismatched[1].nonzero().flatten().tolist() == [4]
    assert (view.teacher_targets == tt.unk_token_id).sum() == 2
    assert not view.same_token[0, 3] and mask[0, 3], "scored by the chunk losses, not compared token by token"
    # the chunk's teacher log-prob is the teacher's log-prob of <unk> there (independent forward)
    tp = render_prompt(tt, ex[0].prompt, False)
    t_comp = tt(st.decode(comp[0][:3]), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = module.teacher(input_ids=torch.tensor([tp + t_comp])).logits[0, -1, : built.teacher.n_ids]
    ref = float(torch.log_softmax(logits.double(), -1)[tt.unk_token_id])
    assert float(teacher.chunk_logprob[0, 3]) == pytest.approx(ref, abs=1e-4)


def test_special_token_rule_on_the_teacher_side_drops_the_whole_chunk(xworld):
    """A student that spells <think> in seven byte tokens: the teacher's first <think> is one token,
    and its chunk (all seven student tokens) is dropped; the second <think> is kept."""
    from opdlm.registry import MASKERS
    _, built, module = xworld
    st = built.student.tokenizer
    ex, comp = solutions(built, 1)
    spelled = [st.convert_tokens_to_ids(c) for c in "<think>"]
    body = st(" 1+1=2", add_special_tokens=False)["input_ids"]
    comp = [spelled + body + spelled + body + [st.eos_token_id]]
    ro = forced_rollout(st, ex, comp)
    view, _, _, _ = module.prepare(ro)
    m = MASKERS.build({"name": "special_tokens", "tokens": [], "teacher_tokens": ["<think>"]}, "maskers.0")
    m.bind(built.ctx)
    keep = m.mask(ro, view)[0, : len(comp[0])]
    assert keep.tolist() == [False] * 7 + [True] * (len(comp[0]) - 7)
    assert int((view.teacher_targets[0] == built.teacher.tokenizer.convert_tokens_to_ids("<think>")).sum()) == 2


def test_config_errors_across_tokenizers():
    from opdlm.errors import ConfigError
    with pytest.raises(ConfigError, match="aligner: 'identity' needs one vocabulary"):
        build_run(demo_cfg(*TINY, "student.tiny_tokenizer=bpe", "student.tiny_vocab=320"))
    with pytest.raises(ConfigError, match=r"support: 'topk' returns ids of one vocabulary.*mapped_topk"):
        build_run(demo_cfg(*TINY, *XTOK, "support.name=teacher_topk", "support.k=4"))
    with pytest.raises(ConfigError, match=r"loss: 'reverse_kl' compares the full vocabulary id by id"):
        build_run(demo_cfg(*TINY, *XTOK, "loss.name=reverse_kl"))
    with pytest.raises(ConfigError, match=r"aligner.roles: '<\|eot\|>' is not a token of the student tokenizer"):
        build_run(demo_cfg(*TINY, *XTOK, 'aligner.roles={"<|eot|>": "<|im_end|>"}'))
    with pytest.raises(ConfigError, match=r"student.tiny_vocab: must be >= 64, got 10"):
        build_run(demo_cfg(*TINY, *XTOK, "student.tiny_vocab=10"))


def test_demo_xtok_runs_end_to_end(tmp_path):
    from opdlm.config import CONF_DIR
    from opdlm.pipeline import Runner

    cfg = demo_cfg(*TINY, f"run.out_dir={tmp_path}", "student.tiny_vocab=320",
                   confs=[str(CONF_DIR / "demo_xtok.yaml")])
    Runner(cfg).run()
    import csv
    rows = list(csv.DictReader(open(tmp_path / "demo_xtok" / "logs" / "opd" / "metrics.csv")))
    keys = rows[0].keys()
    for k in ("xtok/one_to_one_frac", "xtok/topk_eligible_frac", "xtok/unaligned_frac", "xtok/mean_chunk_len",
              "0_chunk_pg/loss", "1_tail_aware/loss", "2_first_byte/loss"):
        assert f"train/{k}" in keys
    vals = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert vals and all(v == v for v in vals)
    assert dataclasses.is_dataclass(Example)
