"""Cross-tokenizer aligner (exact byte offsets): the teacher reads its own rendering of the prompt
plus its own re-tokenisation of the student's completion, and the two token sequences are cut into
chunks where their running byte ends meet (opdlm/xtok/align.py; design in the README).

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

from opdlm.plugin_api import Aligner, Context
from opdlm.registry import ALIGNERS, ConfigError
from opdlm.types import Rollout, TeacherView
from opdlm.xtok.align import INVALID_UTF8, align_rows, teacher_encoder
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

    def align(self, rollout: Rollout, teacher_prompt_ids: list[list[int]] | None = None) -> TeacherView:
        if self.tables is None:
            raise RuntimeError("byte_span aligner used before bind()")
        if teacher_prompt_ids is None:
            raise ValueError("byte_span needs the teacher's own prompt ids")
        tb = self.tables
        dev = rollout.input_ids.device
        B, T = rollout.targets.shape
        targets = rollout.targets.cpu().numpy()
        lens = rollout.response_mask.sum(-1).cpu().numpy()
        rows = [targets[b, : lens[b]].astype(np.int64) for b in range(B)]
        res = align_rows(rows, tb, self.encoder)
        P = max(1, max(len(p) for p in teacher_prompt_ids))
        U = max(1, max(len(r.teacher_ids) for r in res))
        ids = np.full((B, P + U), self.pad_id, dtype=np.int64)
        attn = np.zeros((B, P + U), dtype=np.int64)
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
        for b, (prompt, r) in enumerate(zip(teacher_prompt_ids, res)):
            n, m = len(rows[b]), len(r.teacher_ids)
            ids[b, P - len(prompt) : P] = prompt
            attn[b, P - len(prompt) : P + m] = 1
            ids[b, P : P + m] = r.teacher_ids
            t_cols[b, :m] = P + np.arange(m) - 1
            t_tgt[b, :m] = r.teacher_ids
            t_chunk[b, :m] = r.teacher_chunk
            sc = r.student_chunk
            chunk[b, :n] = sc
            bad[b, :n] = r.status == INVALID_UTF8
            if not (sc >= 0).any():
                continue
            st, one[b, :n], same[b, :n], mism[b, :n] = r.token_flags(tb.safe[rows[b]])
            starts[b, :n] = st
            first_u = np.searchsorted(r.teacher_chunk, np.arange(len(r.chunk_equal)))  # teacher chunks ascend
            c = sc[st]
            pred[b, :n][st] = P + first_u[c] - 1
            tgt[b, :n][st] = r.teacher_ids[first_u[c]]
        pos = np.clip(np.cumsum(attn, -1) - 1, 0, None)
        t = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
        resp = rollout.response_mask
        return TeacherView(
            input_ids=t(ids), attention_mask=t(attn), position_ids=t(pos), pred_columns=t(pred),
            targets=t(tgt), aligned=t(chunk >= 0) & resp, starts=t(starts) & resp, same_token=t(same) & resp,
            chunk=t(chunk), mismatched=t(mism) & resp, invalid_utf8=t(bad) & resp, one_to_one=t(one) & resp,
            teacher_columns=t(t_cols), teacher_targets=t(t_tgt), teacher_chunk=t(t_chunk),
        )
