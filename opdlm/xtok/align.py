"""Exact byte-offset alignment of a student completion with the teacher's re-tokenisation of it.

Per completion (numpy, no per-token Python work beyond joining byte strings):
1. The student's bytes come from the ids it sampled (never from re-tokenising its decoded text).
   Control tokens split the completion into segments; a role-mapped control token (end of turn)
   becomes a one-to-one chunk with the teacher's role token; an unmapped one stops alignment.
2. Each segment is split into valid UTF-8 text and runs of invalid bytes. Text is re-tokenised by
   the teacher without BOS and with special tokens split (a literal "<|im_end|>" stays text);
   invalid bytes are read by the teacher as its single-byte tokens (byte-level vocabularies have
   all 256), else as its unknown token. Only a character cut at the very end of the completion (the
   length budget ran out) is left out as an ``invalid_utf8`` tail.
3. Chunks close where the running byte ends of both sides meet. Teacher tokens that stand for
   bytes they do not spell (an unknown token, read through the encoder's character offsets) make
   their chunk ``mismatched``; so does a normaliser (Qwen's NFC) that rewrote the bytes, in which
   case the two byte strings are matched with difflib and boundaries are taken only where the match
   maps them onto each other.
Mismatched chunks are still scored by the teacher (its log-prob of its own reading of the text):
masking them would let a student hide there from the loss.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from opdlm.xtok.tables import PairTables

# student token status
OK, INVALID_UTF8, UNALIGNED = 0, 1, 2


@dataclass
class RowAlignment:
    """One completion aligned. Chunks are numbered 0..n_chunks-1 in text order."""

    teacher_ids: np.ndarray  # [m] int64 teacher completion ids
    student_chunk: np.ndarray  # [n] int64 chunk of each student token (-1: none)
    teacher_chunk: np.ndarray  # [m] int64 chunk of each teacher token
    chunk_equal: np.ndarray  # [n_chunks] bool: both sides spell the same bytes
    status: np.ndarray  # [n] int8: OK, INVALID_UTF8 or UNALIGNED

    def token_flags(self, safe_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per student token [n] bool: (starts its chunk, one-to-one chunk, same safe token on both
        sides, mismatched chunk); ``safe_tokens`` [n] is the safe flag of each student token."""
        sc = self.student_chunk
        hit = sc >= 0
        k = len(self.chunk_equal)
        starts = hit & np.r_[True, sc[1:] != sc[:-1]] if len(sc) else hit
        s_count = np.bincount(sc[hit], minlength=k)
        t_count = np.bincount(self.teacher_chunk, minlength=k)
        cc = np.where(hit, sc, 0)
        equal = self.chunk_equal[cc] if k else np.zeros_like(hit)
        one = hit & (s_count[cc] == 1) & (t_count[cc] == 1) if k else np.zeros_like(hit)
        return starts, one, one & equal & safe_tokens, hit & ~equal


@lru_cache(maxsize=8)
def _splitting_backend(tokenizer_json: str) -> Any:

    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True  # special tokens typed as text stay text
    tok.no_padding()  # a saved tokenizer may carry padding or truncation settings from its last use
    tok.no_truncation()
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


def utf8_parts(data: bytes, final: bool) -> tuple[list[tuple[bool, bytes]], int]:
    """Split ``data`` into (is_text, bytes) runs of valid UTF-8 and of invalid bytes. With ``final``
    a character cut at the very end is not a run: the returned length stops before it."""
    parts: list[tuple[bool, bytes]] = []
    pos = 0
    while pos < len(data):
        try:
            data[pos:].decode("utf-8")
            parts.append((True, data[pos:]))
            return parts, len(data)
        except UnicodeDecodeError as e:
            if e.start:
                parts.append((True, data[pos : pos + e.start]))
            bad = pos + e.start
            if final and e.reason == "unexpected end of data":
                return parts, bad
            parts.append((False, data[bad : pos + e.end]))
            pos += e.end
    return parts, len(data)


@dataclass
class _Segment:
    parts: list[tuple[bool, bytes]]
    data: bytes  # the bytes the segment aligns (a cut final character left out)
    token_idx: np.ndarray  # student positions of the segment's tokens
    ends: np.ndarray  # their running byte ends (relative to the segment)


def _plan_row(ids: np.ndarray, tables: PairTables) -> tuple[list[_Segment], list[tuple[int, int]]]:
    """Split a completion into segments and the control tokens after them: segments[i] is followed
    by controls[i] (student position, teacher role id or -1) when there is one."""
    s = tables.student
    ctrl_pos = np.nonzero(s.control[ids])[0].tolist()
    segments: list[_Segment] = []
    controls: list[tuple[int, int]] = []
    start = 0
    for c in ctrl_pos + [len(ids)]:
        final = c == len(ids)
        data = b"".join([s.pieces[i] for i in ids[start:c].tolist()])
        parts, cut = utf8_parts(data, final)
        segments.append(_Segment(parts=parts, data=data[:cut], token_idx=np.arange(start, c),
                                 ends=np.cumsum(s.lengths[ids[start:c]])))
        if final:
            break
        role = tables.roles.get(int(ids[c]), -1)
        controls.append((int(c), role))
        if role < 0:
            break
        start = c + 1
    return segments, controls


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
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Common boundaries (student end, teacher end) when the byte strings differ."""
    blocks = _matching_blocks(sd, td)
    t_set = set(t_ends.tolist())
    pairs = [(0, 0)]
    for e in s_ends.tolist():
        for a, b, size in blocks:
            if a <= e <= a + size:
                te = b + e - a
                if te in t_set and te > pairs[-1][1] and e > pairs[-1][0]:
                    pairs.append((e, te))
                break
    last = (len(sd), len(td))
    if pairs[-1] != last and len(sd) in set(s_ends.tolist()) and len(td) in t_set:
        pairs.append(last)  # both strings end: the last (differing) chunk closes
    return (np.array([p[0] for p in pairs[1:]], dtype=np.int64),
            np.array([p[1] for p in pairs[1:]], dtype=np.int64))


def _teacher_side(seg: _Segment, encodings: list[Any], tables: PairTables
                  ) -> tuple[np.ndarray, list[bytes], np.ndarray] | None:
    """Teacher ids of a segment, the bytes each stands for, and which stand for bytes they do not
    spell (unknown tokens); None when the teacher cannot read the segment at all."""
    t = tables.teacher
    ids: list[int] = []
    pieces: list[bytes] = []
    unknown: list[bool] = []
    enc_iter = iter(encodings)
    for is_text, run in seg.parts:
        if is_text:
            e = next(enc_iter)
            text = run.decode("utf-8")
            for i, (cs, ce) in zip(e.ids, e.offsets):
                if 0 <= i < len(t.lengths) and not t.control[i]:
                    ids.append(i)
                    pieces.append(t.pieces[i])
                    unknown.append(False)
                else:  # an unknown token (or an id past the model's rows): the characters it covers
                    if ce <= cs or not 0 <= i < len(t.lengths):
                        return None
                    ids.append(i)
                    pieces.append(text[cs:ce].encode("utf-8"))
                    unknown.append(True)
        else:
            for byte in run:
                i = int(tables.byte_ids[byte])
                if i < 0:
                    return None
                ids.append(i)
                pieces.append(bytes([byte]))
                unknown.append(bool(t.control[i]))
    return np.asarray(ids, dtype=np.int64), pieces, np.asarray(unknown, dtype=bool)


def _align_segment(seg: _Segment, t_ids: np.ndarray, t_pieces: list[bytes], t_unknown: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """(student chunk per token (-1 none, local numbering), teacher ids kept, their chunks, chunk
    equality, whether the whole segment is aligned)."""
    cut = len(seg.data)
    t_len = np.fromiter((len(p) for p in t_pieces), dtype=np.int64, count=len(t_pieces))
    t_ends = np.cumsum(t_len)
    s_ends = seg.ends[seg.ends <= cut]
    td = b"".join(t_pieces)
    if td == seg.data:
        cs = ct = np.intersect1d(s_ends, t_ends, assume_unique=True)
    else:
        cs, ct = _match_boundaries(seg.data, td, s_ends, t_ends)
    last_s = int(cs[-1]) if len(cs) else 0
    last_t = int(ct[-1]) if len(ct) else 0
    s_chunk = np.searchsorted(cs, seg.ends, side="left").astype(np.int64)
    s_chunk[seg.ends > last_s] = -1
    keep = t_ends <= last_t
    t_chunk = np.searchsorted(ct, t_ends[keep], side="left").astype(np.int64)
    if td == seg.data:
        eq = np.ones(len(cs), dtype=bool)
    else:
        starts_s, starts_t = np.r_[0, cs[:-1]].tolist(), np.r_[0, ct[:-1]].tolist()
        eq = np.array([seg.data[a0:a1] == td[b0:b1]
                       for a0, a1, b0, b1 in zip(starts_s, cs.tolist(), starts_t, ct.tolist())], dtype=bool)
    if t_unknown[keep].any():
        eq[np.unique(t_chunk[t_unknown[keep]])] = False
    whole = (len(seg.ends) == 0 or (cut == seg.ends[-1] and last_s == cut)) and last_t == (t_ends[-1] if len(t_ends) else 0)
    return s_chunk, t_ids[keep], t_chunk, eq, bool(whole)


def align_rows(rows: list[np.ndarray], tables: PairTables, encoder: Any) -> list[RowAlignment]:
    """Align each student completion (its sampled ids, up to and including EOS)."""
    plans = [_plan_row(ids, tables) for ids in rows]
    texts = [run.decode("utf-8") for segs, _ in plans for seg in segs for is_text, run in seg.parts if is_text]
    encoded = encoder.encode_batch(texts, add_special_tokens=False) if texts else []
    pos = 0
    out = []
    for ids, (segs, controls) in zip(rows, plans):
        n = len(ids)
        s_chunk = np.full(n, -1, dtype=np.int64)
        status = np.full(n, UNALIGNED, dtype=np.int8)
        t_parts, tc_parts, eq_parts = [], [], []
        n_chunks = 0
        going = True
        for i, seg in enumerate(segs):
            k = sum(1 for is_text, _ in seg.parts if is_text)
            encs = encoded[pos : pos + k]
            pos += k
            if not going:
                continue
            side = _teacher_side(seg, encs, tables)
            if side is None:
                going = False
                continue
            sc, tk, tc, eq, whole = _align_segment(seg, *side)
            idx = seg.token_idx
            hit = sc >= 0
            s_chunk[idx[hit]] = sc[hit] + n_chunks
            status[idx[hit]] = OK
            status[idx[(~hit) & (seg.ends > len(seg.data))]] = INVALID_UTF8
            t_parts.append(tk)
            tc_parts.append(tc + n_chunks)
            eq_parts.append(eq)
            n_chunks += len(eq)
            if i < len(controls) and whole and controls[i][1] >= 0:
                c_pos, role = controls[i]
                s_chunk[c_pos] = n_chunks
                status[c_pos] = OK
                t_parts.append(np.array([role], dtype=np.int64))
                tc_parts.append(np.array([n_chunks], dtype=np.int64))
                eq_parts.append(np.ones(1, dtype=bool))
                n_chunks += 1
            else:
                going = False

        def cat(xs: list[np.ndarray], dt: type) -> np.ndarray:
            return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)

        out.append(RowAlignment(teacher_ids=cat(t_parts, np.int64), student_chunk=s_chunk,
                                teacher_chunk=cat(tc_parts, np.int64), chunk_equal=cat(eq_parts, bool),
                                status=status))
    return out
