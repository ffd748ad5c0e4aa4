"""Exact byte-offset alignment of a student completion with the teacher's re-tokenisation of it.

Per completion (numpy, no per-token Python work beyond joining byte strings):
1. The student's bytes come from the ids it sampled (never from re-tokenising its decoded text).
   Control tokens split the completion into text segments; a role-mapped control token (end of
   turn) becomes a one-to-one chunk with the teacher's role token; an unmapped one stops alignment.
2. Each segment keeps its longest valid UTF-8 prefix; later tokens are unaligned (``invalid_utf8``).
3. The prefix is re-tokenised by the teacher without BOS and with special tokens split (a literal
   "<|im_end|>" in the text stays text).
4. Chunks close where the running byte ends of both sides meet. When the teacher's bytes differ
   from the student's (a normaliser such as NFC rewrote the text) the two byte strings are matched
   with difflib and boundaries are taken only where the match maps them onto each other; chunks
   whose bytes differ are flagged ``mismatched``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from opdlm.xtok.tables import PairTables

# student token status
OK, INVALID_UTF8, UNALIGNED = 0, 1, 2


@dataclass
class RowAlignment:
    """One completion aligned. Chunks are numbered 0..n_chunks-1 in text order."""

    teacher_ids: np.ndarray  # [m] int64 teacher completion ids
    student_chunk: np.ndarray  # [n] int64 chunk of each student token (-1: none)
    teacher_chunk: np.ndarray  # [m] int64 chunk of each teacher token
    chunk_equal: np.ndarray  # [n_chunks] bool: both sides hold the same bytes
    status: np.ndarray  # [n] int8: OK, INVALID_UTF8 or UNALIGNED


@lru_cache(maxsize=8)
def _splitting_backend(tokenizer_json: str) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True  # special tokens typed as text stay text
    return tok


_BACKENDS: dict[int, tuple[Any, Any]] = {}


def teacher_encoder(tokenizer: Any) -> Any:
    """A copy of the tokenizer's backend that splits special tokens (the original is untouched)."""
    hit = _BACKENDS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    enc = _splitting_backend(tokenizer.backend_tokenizer.to_str())
    _BACKENDS[id(tokenizer)] = (tokenizer, enc)
    return enc


def valid_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that is valid UTF-8."""
    try:
        data.decode("utf-8")
        return len(data)
    except UnicodeDecodeError as e:
        return e.start


@dataclass
class _Segment:
    text: str
    data: bytes  # the valid prefix
    token_idx: np.ndarray  # student token positions of the segment's text tokens
    ends: np.ndarray  # their running byte ends (relative to the segment)
    cut: int  # valid prefix length


def _plan_row(ids: np.ndarray, tables: PairTables) -> tuple[list[_Segment], list[tuple[int, int]], int]:
    """Split a completion into text segments and control tokens.

    Returns (segments, control [(student position, teacher id or -1)], stop): segments[i] is
    followed by control[i] when there is one; positions >= stop are not aligned."""
    s = tables.student
    ctrl_pos = np.nonzero(s.control[ids])[0]
    segments: list[_Segment] = []
    controls: list[tuple[int, int]] = []
    start = 0
    bounds = list(ctrl_pos) + [len(ids)]
    for c in bounds:
        idx = np.arange(start, c)
        pieces = s.pieces
        data = b"".join([pieces[i] for i in ids[start:c].tolist()])
        cut = valid_utf8_prefix(data)
        ends = np.cumsum(s.lengths[ids[start:c]])
        segments.append(_Segment(text=data[:cut].decode("utf-8"), data=data[:cut], token_idx=idx,
                                 ends=ends, cut=cut))
        if c == len(ids):
            break
        if cut < len(data):  # a broken character before the control token: stop here
            return segments, controls, c
        role = tables.roles.get(int(ids[c]), -1)
        controls.append((int(c), role))
        if role < 0:
            return segments, controls, c
        start = c + 1
    return segments, controls, len(ids)


def _common_prefix(a: bytes, b: bytes) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search on slice equality (memcmp speed)
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _matching_blocks(sd: bytes, td: bytes) -> list[tuple[int, int, int]]:
    """difflib's matching blocks, with the common prefix and suffix taken out first (normaliser
    changes are local, so difflib only sees the span between the first and last difference)."""
    p = _common_prefix(sd, td)
    q = _common_prefix(sd[p:][::-1], td[p:][::-1])
    ms, mt = sd[p : len(sd) - q], td[p : len(td) - q]
    blocks = [(0, 0, p)] if p else []
    sm = difflib.SequenceMatcher(None, ms, mt, autojunk=False)
    blocks += [(a + p, b + p, n) for a, b, n in sm.get_matching_blocks() if n]
    if q:
        blocks.append((len(sd) - q, len(td) - q, q))
    return blocks


def _match_boundaries(sd: bytes, td: bytes, s_ends: np.ndarray, t_ends: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Common boundaries (student end, teacher end) when the byte strings differ, and whether the
    chunk ending at each holds equal bytes on both sides."""
    blocks = _matching_blocks(sd, td)
    t_set = set(t_ends.tolist())
    pairs = [(0, 0)]
    for e in s_ends.tolist():
        for a, b, size in blocks:
            if a <= e <= a + size and size:
                te = b + e - a
                if te in t_set and te > pairs[-1][1]:
                    pairs.append((e, te))
                break
    if (len(sd), len(td)) != pairs[-1] and len(sd) in set(s_ends.tolist()) and len(td) in t_set:
        pairs.append((len(sd), len(td)))  # both strings end: the last (differing) chunk closes
    ps = np.array([p[0] for p in pairs[1:]], dtype=np.int64)
    pt = np.array([p[1] for p in pairs[1:]], dtype=np.int64)
    eq = np.array([sd[a0:a1] == td[b0:b1] for (a0, b0), (a1, b1) in zip(pairs[:-1], pairs[1:])], dtype=bool)
    return ps, pt, eq


def _align_segment(seg: _Segment, t_ids: np.ndarray, tables: PairTables
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """(student chunk [n_seg] (-1 none, local numbering), teacher ids kept, their chunks, chunk
    equality, whether the whole segment is aligned)."""
    t = tables.teacher
    s_ends = seg.ends[seg.ends <= seg.cut]
    known = (t_ids >= 0) & (t_ids < len(t.lengths))
    if not known.all() or t.control[t_ids].any():  # ids past the model's rows, or without bytes
        return np.full(len(seg.ends), -1, np.int64), t_ids[:0], t_ids[:0], np.zeros(0, bool), False
    t_ends = np.cumsum(t.lengths[t_ids])
    same = (t_ends[-1] if len(t_ends) else 0) == seg.cut and b"".join([t.pieces[i] for i in t_ids.tolist()]) == seg.data
    if same:
        common = np.intersect1d(s_ends, t_ends, assume_unique=True)
        eq = np.ones(len(common), dtype=bool)
        cs, ct = common, common
    else:
        td = b"".join([t.pieces[i] for i in t_ids.tolist()])
        cs, ct, eq = _match_boundaries(seg.data, td, s_ends, t_ends)
    last_s = cs[-1] if len(cs) else 0
    last_t = ct[-1] if len(ct) else 0
    s_chunk = np.searchsorted(cs, seg.ends, side="left").astype(np.int64)
    s_chunk[seg.ends > last_s] = -1
    keep = t_ends <= last_t
    t_chunk = np.searchsorted(ct, t_ends[keep], side="left").astype(np.int64)
    whole = len(seg.ends) == 0 or (seg.cut == seg.ends[-1] and last_s == seg.cut)
    return s_chunk, t_ids[keep], t_chunk, eq, bool(whole and last_t == (t_ends[-1] if len(t_ends) else 0))


def align_rows(rows: list[np.ndarray], tables: PairTables, encoder: Any) -> list[RowAlignment]:
    """Align each student completion (its sampled ids, up to and including EOS)."""
    plans = [_plan_row(ids, tables) for ids in rows]
    texts = [seg.text for segs, _, _ in plans for seg in segs]
    encoded = encoder.encode_batch(texts, add_special_tokens=False) if texts else []
    enc_iter = iter(encoded)
    out = []
    for ids, (segs, controls, stop) in zip(rows, plans):
        n = len(ids)
        s_chunk = np.full(n, -1, dtype=np.int64)
        status = np.full(n, UNALIGNED, dtype=np.int8)
        t_parts, tc_parts, eq_parts = [], [], []
        n_chunks = 0
        aligned_so_far = True
        for i, seg in enumerate(segs):
            t_ids = np.asarray(next(enc_iter).ids, dtype=np.int64)
            if not aligned_so_far:
                continue
            sc, tk, tc, eq, whole = _align_segment(seg, t_ids, tables)
            idx = seg.token_idx
            hit = sc >= 0
            s_chunk[idx[hit]] = sc[hit] + n_chunks
            status[idx[hit]] = OK
            status[idx[(~hit) & (seg.ends > seg.cut)]] = INVALID_UTF8
            t_parts.append(tk)
            tc_parts.append(tc + n_chunks)
            eq_parts.append(eq)
            n_chunks += len(eq)
            if i < len(controls) and whole and controls[i][1] >= 0:
                pos, role = controls[i]
                s_chunk[pos] = n_chunks
                status[pos] = OK
                t_parts.append(np.array([role], dtype=np.int64))
                tc_parts.append(np.array([n_chunks], dtype=np.int64))
                eq_parts.append(np.ones(1, dtype=bool))
                n_chunks += 1
            else:
                aligned_so_far = False
        del stop
        def cat(xs: list[np.ndarray], dt: type) -> np.ndarray:
            return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
        out.append(RowAlignment(teacher_ids=cat(t_parts, np.int64), student_chunk=s_chunk,
                                teacher_chunk=cat(tc_parts, np.int64), chunk_equal=cat(eq_parts, bool),
                                status=status))
    return out
