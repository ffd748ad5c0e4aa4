"""Per-tokenizer byte tables and the per-pair maps that cross-tokenizer alignment needs.

Built once per tokenizer (and pair) and cached:
- ``token_bytes``: id -> bytes for every output row of a model. Byte-level pieces go through the
  GPT-2 byte table; non-special added tokens are their literal UTF-8 text; special (control) tokens,
  ids past the tokenizer and pieces with no bytes carry none and are flagged ``control``.
- ``pair_tables``: the exact byte-string map teacher id -> student id (-1: none), its inverse, the
  role map of control tokens (student <|eot_id|> <-> teacher <|im_end|>, from configuration), the
  "safe" flag per student id (may be compared token against token: has bytes, is not an added
  token, holds no digit, exists in the teacher's vocabulary), and first-byte bins shared by both
  sides (for the first-byte marginal).
Nothing here hard-codes an id: every id comes from the tokenizers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from opdlm.errors import ConfigError
from opdlm.rollouts import end_ids

CONTROL_BIN = 256  # first-byte bin of tokens without bytes (and of bytes one side cannot start with)
N_BINS = 257


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode table (the printable stand-ins of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _component_types(obj: Any) -> list[str]:
    """Type names of a tokenizers component, nested Sequences flattened."""
    if obj is None:
        return []
    try:
        state = json.loads(obj.__getstate__())
    except Exception:  # noqa: BLE001 - an unknown component: reported by type name only
        return [type(obj).__name__]
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "type" in node:
                out.append(str(node["type"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(state)
    return out


def piece_encoding(tokenizer: Any) -> str:
    """'byte_level' or 'literal' (how a piece string becomes bytes), or a ConfigError."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    name = type(tokenizer).__name__
    if backend is None:
        raise ConfigError(f"the tokenizer ({name}) is not a fast tokenizer: its pieces cannot be turned into bytes")
    dec = _component_types(backend.decoder)
    pre = _component_types(backend.pre_tokenizer)
    if "ByteLevel" in dec or "ByteLevel" in pre:
        return "byte_level"
    if set(dec) <= {"Fuse"} and not set(pre) & {"Metaspace", "WhitespaceSplit", "BertPreTokenizer", "Whitespace"}:
        return "literal"
    raise ConfigError(
        f"the tokenizer's pieces cannot be turned into bytes: decoder {dec or ['none']}, pre-tokenizer "
        f"{pre or ['none']} (supported: byte-level BPE, or pieces that are literal text)"
    )


@dataclass(frozen=True)
class TokenBytes:
    """Bytes of every output row of one model."""

    pieces: list[bytes]  # [rows]; b"" for control tokens and padding rows
    lengths: np.ndarray  # [rows] int64 byte lengths (0: control)
    control: np.ndarray  # [rows] bool: no bytes (special token, padding row, empty piece)
    added: np.ndarray  # [rows] bool: an added token (special or not)
    digit: np.ndarray  # [rows] bool: the bytes hold an ASCII digit
    first: np.ndarray  # [rows] int64 first byte (CONTROL_BIN when there is none)
    ids: int  # ids the tokenizer lists (rows may be more, or fewer when the extras are control tokens)


_TB_CACHE: dict[tuple[int, int], tuple[Any, TokenBytes]] = {}


def token_bytes(tokenizer: Any, rows: int, side: str = "") -> TokenBytes:
    """The byte table of ``tokenizer`` sized to a model with ``rows`` output rows (cached)."""
    key = (id(tokenizer), rows)
    hit = _TB_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    where = f"{side} tokenizer" if side else "tokenizer"
    try:
        enc = piece_encoding(tokenizer)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}", key="") from None
    n = len(tokenizer)
    added = {int(i): tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    specials = set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
    pieces_str = tokenizer.convert_ids_to_tokens(list(range(n)))
    table = byte_decoder()
    pieces: list[bytes] = [b""] * rows
    ctrl = np.ones(rows, dtype=bool)
    is_added = np.zeros(rows, dtype=bool)
    bad: list[tuple[int, str]] = []
    for i in range(min(n, rows)):
        a = added.get(i)
        if a is not None:
            is_added[i] = True
            if a.special or i in specials:
                continue
            b = a.content.encode("utf-8")
        elif i in specials:
            continue
        else:
            p = pieces_str[i]
            if p is None:
                continue
            if enc == "byte_level":
                try:
                    b = bytes(table[c] for c in p)
                except KeyError:
                    bad.append((i, p))
                    continue
            else:
                b = p.encode("utf-8")
        if b:
            pieces[i] = b
            ctrl[i] = False
    if bad:
        i, p = bad[0]
        raise ConfigError(f"{where}: {len(bad)} byte-level pieces hold characters outside the byte table "
                          f"(first: id {i} {p!r}); its pieces cannot be turned into bytes")
    for i in range(rows, n):  # ids past the model's rows must be control tokens it never predicts
        a = added.get(i)
        if not ((a is not None and a.special) or i in specials):
            raise ConfigError(f"{where}: the model has {rows} output rows, but id {i} "
                              f"({pieces_str[i]!r}) is a text token past them")
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=rows)
    digit = np.fromiter((any(48 <= c <= 57 for c in p) for p in pieces), dtype=bool, count=rows)
    first = np.fromiter((p[0] if p else CONTROL_BIN for p in pieces), dtype=np.int64, count=rows)
    tb = TokenBytes(pieces=pieces, lengths=lengths, control=ctrl, added=is_added, digit=digit,
                    first=first, ids=n)
    _TB_CACHE[key] = (tokenizer, tb)
    return tb


def control_id(tokenizer: Any, text: str, table: TokenBytes, side: str) -> int:
    """The id of the control token spelled ``text`` (a ConfigError if absent or not a control token)."""
    vocab = tokenizer.get_vocab()
    if text not in vocab:
        raise ConfigError(f"'{text}' is not a token of the {side} tokenizer", key="roles")
    i = int(vocab[text])
    if i >= len(table.control) or not table.control[i]:
        raise ConfigError(f"'{text}' is a text token of the {side} tokenizer, not a control token", key="roles")
    return i


@dataclass(frozen=True)
class PairTables:
    """Everything alignment needs about one (student, teacher) tokenizer pair."""

    student: TokenBytes
    teacher: TokenBytes
    t2s: np.ndarray  # [teacher rows] int64: student id with the same bytes (or role), -1: none
    s2t: np.ndarray  # [student rows] int64: the inverse map, -1: none
    roles: dict[int, int]  # student control id -> teacher control id
    byte_ids: np.ndarray  # [256] int64 teacher id that reads one raw byte (its byte token, else its unknown token; -1 none)
    safe: np.ndarray  # [student rows] bool: may be compared token against token
    s_bins: np.ndarray  # [student rows] int64 first-byte bin
    t_bins: np.ndarray  # [teacher rows] int64 first-byte bin


_PAIR_CACHE: dict[tuple, tuple[Any, Any, PairTables]] = {}


def pair_tables(student_tok: Any, teacher_tok: Any, student_rows: int, teacher_rows: int,
                roles: dict[str, str] | None = None) -> PairTables:
    """Tables of a tokenizer pair (cached per pair, rows and role map). The role map always holds
    end of sequence <-> end of sequence and the control tokens spelled alike on both sides (<pad>
    <-> <pad>); ``roles`` adds pairs of student -> teacher control-token strings (and wins)."""
    roles = dict(roles or {})
    key = (id(student_tok), id(teacher_tok), student_rows, teacher_rows, tuple(sorted(roles.items())))
    hit = _PAIR_CACHE.get(key)
    if hit is not None and hit[0] is student_tok and hit[1] is teacher_tok:
        return hit[2]
    s = token_bytes(student_tok, student_rows, "student")
    t = token_bytes(teacher_tok, teacher_rows, "teacher")
    role_ids: dict[int, int] = {}
    t_vocab = teacher_tok.get_vocab()
    for text, i in student_tok.get_vocab().items():  # control tokens spelled alike
        j = t_vocab.get(text)
        if j is not None and i < len(s.control) and j < len(t.control) and s.control[i] and t.control[j]:
            role_ids[int(i)] = int(j)
    if student_tok.eos_token_id is not None and teacher_tok.eos_token_id is not None:
        for i in end_ids(student_tok):  # (a base tokenizer's former eos ends a response too: models.end_ids)
            role_ids[int(i)] = int(teacher_tok.eos_token_id)
    for sv, tv in roles.items():
        role_ids[control_id(student_tok, sv, s, "student")] = control_id(teacher_tok, tv, t, "teacher")
    # a raw byte (invalid UTF-8 in the student's text) is read by the teacher's one-byte token
    t_by_bytes: dict[bytes, int] = {}
    for i, p in enumerate(t.pieces):
        if len(p) == 1 and p not in t_by_bytes:
            t_by_bytes[p] = i
    unk = teacher_tok.unk_token_id
    unk = int(unk) if unk is not None and unk < len(t.pieces) else -1
    byte_ids = np.array([t_by_bytes.get(bytes([b]), unk) for b in range(256)], dtype=np.int64)
    by_bytes: dict[bytes, int] = {}
    for i, p in enumerate(s.pieces):
        if p and p not in by_bytes:
            by_bytes[p] = i
    t2s = np.fromiter((by_bytes.get(p, -1) if p else -1 for p in t.pieces), dtype=np.int64, count=len(t.pieces))
    s2t = np.full(len(s.pieces), -1, dtype=np.int64)
    hit_t = np.nonzero(t2s >= 0)[0]
    s2t[t2s[hit_t][::-1]] = hit_t[::-1]  # the lowest teacher id wins on duplicates
    for si, ti in role_ids.items():
        t2s[ti] = si
        s2t[si] = ti
    # digits and added tokens mean different things in different vocabularies (Llama "4" ends a
    # number sooner than Qwen "4"); with one vocabulary on both sides every shared token is safe
    n_ids = min(s.ids, t.ids, len(s.pieces), len(t.pieces))  # the models may pad their rows differently
    same_vocab = (s.ids == t.ids and s.pieces[:n_ids] == t.pieces[:n_ids]
                  and bool((s.control[:n_ids] == t.control[:n_ids]).all()))
    safe = ~s.control & (s2t >= 0)
    if not same_vocab:
        safe &= ~s.added & ~s.digit
    for si in role_ids:  # the end-of-turn pair: both models' probability of ending here
        safe[si] = True
    # first-byte bins: a byte only one side can start a token with goes to the shared control bin
    both = np.zeros(N_BINS, dtype=bool)
    both[np.unique(s.first)] = True
    t_has = np.zeros(N_BINS, dtype=bool)
    t_has[np.unique(t.first)] = True
    both &= t_has
    both[CONTROL_BIN] = True
    s_bins = np.where(both[s.first], s.first, CONTROL_BIN)
    t_bins = np.where(both[t.first], t.first, CONTROL_BIN)
    pt = PairTables(student=s, teacher=t, t2s=t2s, s2t=s2t, roles=role_ids, byte_ids=byte_ids, safe=safe,
                    s_bins=s_bins, t_bins=t_bins)
    _PAIR_CACHE[key] = (student_tok, teacher_tok, pt)
    return pt


def tables_for(ctx: Any) -> PairTables:
    """The aligner's tables when it published them (Context.vocab_map), else those of the pair with
    the default role map (end of sequence <-> end of sequence)."""
    if ctx.vocab_map is not None:
        return ctx.vocab_map
    return pair_tables(ctx.student_tokenizer, ctx.teacher_tokenizer, ctx.student_vocab_rows, ctx.teacher_vocab_rows)
