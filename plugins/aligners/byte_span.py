"""Cross-tokenizer aligner (exact byte offsets): the teacher reads its own rendering of the prompt
plus its own re-tokenisation of the student's completion, and the two token sequences are cut into
chunks where their running byte ends meet (opdlm/xtok/align.py; design in docs/cross-tokenizer.md).

The teacher sequence per rollout: teacher prompt (left-padded to P') + teacher completion
(right-padded to U). Output: a TeacherView with pred_columns/targets at chunk starts, chunk ids for
both sides, and the position sets aligned ⊇ starts ⊇ same_token.
Option: roles (mapping student control token -> teacher control token, e.g.
{"<|end_of_text|>": "<|endoftext|>"}), added to the pairs that always hold: end of sequence <->
end of sequence, and control tokens spelled alike on both sides. Role tokens must exist and be
control tokens on both sides. Byte tables are built once per tokenizer pair and cached.
"""

from __future__ import annotations

import numpy as np
import torch

from opdlm.errors import ConfigError
from opdlm.plugin_api import Aligner, Context
from opdlm.registry import ALIGNERS
from opdlm.types import Rollout, TeacherView
from opdlm.xtok.align import INVALID_UTF8, OK, align_rows, teacher_encoder
from opdlm.xtok.tables import PairTables, pair_tables


@ALIGNERS.register("byte_span")
class ByteSpan(Aligner):
    """Exact byte-offset chunks between the student's sampled tokens and the teacher's re-tokenisation."""

    uses_teacher_prompt = True
    shared_vocabulary = False

    def __init__(self, *, roles: dict[str, str] | None = None) -> None:
        if roles is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in roles.items()):
            raise ConfigError(f"roles: must map student token strings to teacher token strings, got {roles!r}")
        self.roles = dict(roles) if roles is not None else None
        self.tables: PairTables | None = None
        self.encoder = None
        self.pad_id = 0

    def bind(self, ctx: Context) -> None:
        self.tables = pair_tables(ctx.student_tokenizer, ctx.teacher_tokenizer, ctx.student_vocab_rows,
                                  ctx.teacher_vocab_rows, self.roles)
        self.encoder = teacher_encoder(ctx.teacher_tokenizer)
        pad = ctx.teacher_tokenizer.pad_token_id
        if pad is None or pad >= ctx.teacher_vocab_rows:  # e.g. an id past the model's rows
            pad = ctx.teacher_tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None and pad < ctx.teacher_vocab_rows else 0
        ctx.vocab_map = self.tables

    def align(self, rollout: Rollout, teacher_prompt_ids: list[list[int]] | None = None,
              teacher_turns: list[list[list[int]]] | None = None) -> TeacherView:
        if self.tables is None:
            raise RuntimeError("byte_span aligner used before bind()")
        if teacher_prompt_ids is None:
            raise ValueError("byte_span needs the teacher's own prompt ids")
        tb = self.tables
        dev = rollout.input_ids.device
        B, T = rollout.targets.shape
        targets = rollout.targets.cpu().numpy()
        mine = rollout.response_mask.cpu().numpy()
        real = rollout.attention_mask[:, rollout.prompt_len:].cpu().numpy().astype(bool)
        # each row as pieces: the student's runs of tokens (aligned, each on its own) and, between
        # them in a multi-turn conversation, user turns (the teacher reads its own rendering)
        pieces = [_pieces(mine[b], real[b]) for b in range(B)]
        actions = [targets[b, a:e].astype(np.int64) for b in range(B) for kind, a, e in pieces[b] if kind]
        res = iter(align_rows(actions, tb, self.encoder))
        rows: list[list[tuple[int, int, object]]] = []
        for b in range(B):
            row, k, broken = [], 0, False
            for kind, a, e in pieces[b]:
                if kind:
                    r = next(res)
                    if broken:  # (consumed, not used)
                        continue
                    row.append((a, e, r))
                    # an action that did not align to its end (a control token without a role, unreadable
                    # bytes): the teacher's context would differ from the student's from here on, so
                    # nothing after it is aligned (in a single-turn row nothing follows anyway)
                    broken = bool((r.status != OK).any())
                    continue
                if broken:
                    continue
                if teacher_turns is None or k >= len(teacher_turns[b]):
                    raise ValueError("byte_span: a multi-turn rollout needs the teacher's rendering of each user turn "
                                     "(teacher_turns)")
                row.append((a, e, np.asarray(teacher_turns[b][k], dtype=np.int64)))
                k += 1
            rows.append(row)
        P = max(1, max(len(p) for p in teacher_prompt_ids))
        turn = lambda x: isinstance(x, np.ndarray)  # noqa: E731 - a user turn's ids (else an action's alignment)
        width = [sum(len(x) if turn(x) else len(x.teacher_ids) for _, _, x in row) for row in rows]  # teacher tokens
        W = max(1, max(width))
        U = max(1, max(sum(len(x.teacher_ids) for _, _, x in row if not turn(x)) for row in rows))  # of actions
        ids = np.full((B, P + W), self.pad_id, dtype=np.int64)
        attn = np.zeros((B, P + W), dtype=np.int64)
        t_cols = np.full((B, U), -1, dtype=np.int64)
        t_tgt = np.full((B, U), -1, dtype=np.int64)
        t_chunk = np.full((B, U), -1, dtype=np.int64)
        pred = np.full((B, T), -1, dtype=np.int64)
        tgt = np.full((B, T), -1, dtype=np.int64)
        chunk = np.full((B, T), -1, dtype=np.int64)
        starts = np.zeros((B, T), dtype=bool)
        one = np.zeros((B, T), dtype=bool)
        same = np.zeros((B, T), dtype=bool)
        mism = np.zeros((B, T), dtype=bool)
        bad = np.zeros((B, T), dtype=bool)
        for b, (prompt, row) in enumerate(zip(teacher_prompt_ids, rows)):
            ids[b, P - len(prompt) : P] = prompt
            attn[b, P - len(prompt) : P + width[b]] = 1
            col, u, chunks = P, 0, 0  # next teacher column, completion token, chunk number
            for a, e, r in row:
                if turn(r):  # a user turn: context only
                    ids[b, col : col + len(r)] = r
                    col += len(r)
                    continue
                m = len(r.teacher_ids)
                ids[b, col : col + m] = r.teacher_ids
                t_cols[b, u : u + m] = col + np.arange(m) - 1
                t_tgt[b, u : u + m] = r.teacher_ids
                t_chunk[b, u : u + m] = np.where(r.teacher_chunk >= 0, r.teacher_chunk + chunks, -1)
                sc = r.student_chunk
                chunk[b, a:e] = np.where(sc >= 0, sc + chunks, -1)
                bad[b, a:e] = r.status == INVALID_UTF8
                if (sc >= 0).any():
                    st, one[b, a:e], same[b, a:e], mism[b, a:e] = r.token_flags(tb.safe[targets[b, a:e]])
                    starts[b, a:e] = st
                    first_u = np.searchsorted(r.teacher_chunk, np.arange(len(r.chunk_equal)))  # teacher chunks ascend
                    c = sc[st]
                    pred[b, a:e][st] = col + first_u[c] - 1
                    tgt[b, a:e][st] = r.teacher_ids[first_u[c]]
                col, u, chunks = col + m, u + m, chunks + len(r.chunk_equal)
        pos = np.clip(np.cumsum(attn, -1) - 1, 0, None)
        t = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
        resp = rollout.response_mask
        return TeacherView(
            input_ids=t(ids), attention_mask=t(attn), position_ids=t(pos), pred_columns=t(pred),
            targets=t(tgt), aligned=t(chunk >= 0) & resp, starts=t(starts) & resp, same_token=t(same) & resp,
            chunk=t(chunk), mismatched=t(mism) & resp, invalid_utf8=t(bad) & resp, one_to_one=t(one) & resp,
            teacher_columns=t(t_cols), teacher_targets=t(t_tgt), teacher_chunk=t(t_chunk),
        )


def _pieces(mine: np.ndarray, real: np.ndarray) -> list[tuple[bool, int, int]]:
    """(the student's tokens?, start, end) runs of a row's response region: the student's runs
    (``mine``) and the other real tokens between them (user turns of a conversation). A single-turn
    row is one run: its response up to and including EOS."""
    out: list[tuple[bool, int, int]] = []
    n = int(real.sum()) if real.any() else 0
    n = max(n, int(np.nonzero(mine)[0].max()) + 1 if mine.any() else 0)
    a = 0
    while a < n:
        kind = bool(mine[a])
        e = a
        while e < n and bool(mine[e]) == kind:
            e += 1
        out.append((kind, a, e))
        a = e
    if not out:
        out.append((True, 0, 0))
    return out
