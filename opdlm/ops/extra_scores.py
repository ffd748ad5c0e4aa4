"""Scores fields that serve one kind of loss, computed only when a loss declares it reads them
(opdlm.reads.Reads): the first-byte marginals (``byte_logprobs``, read by first_byte) and the
teacher's log-prob of each whole chunk (``chunk_logprob``, read by chunk_pg)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from opdlm.ops.batch import per_chunk_sum
from opdlm.ops.head import gather_columns, head_scores
from opdlm.types import Scores, TeacherView
from opdlm.xtok.tables import tables_for


class FirstByteBins:
    """The first-byte bin of every output row of each side (the ``buckets`` of ``head_scores``),
    built from the run's vocabulary tables once and kept per device."""

    def __init__(self, ctx: Any, student_rows: int, teacher_rows: int) -> None:
        self.ctx, self.rows = ctx, {"student": student_rows, "teacher": teacher_rows}
        self._cache: dict[str, Tensor] = {}

    def __call__(self, side: str, device: torch.device) -> Tensor:
        if side not in self._cache:
            pt = tables_for(self.ctx)
            bins = pt.t_bins if side == "teacher" else pt.s_bins
            self._cache[side] = torch.from_numpy(bins[: self.rows[side]].copy())
        if self._cache[side].device != device:
            self._cache[side] = self._cache[side].to(device)
        return self._cache[side]


@torch.no_grad()
def chunk_logprob(scores: Scores, hidden: Tensor, head: nn.Linear | None, view: TeacherView, *,
                  temperature: float, vocab_rows: int, block: int | None) -> Tensor:
    """[B, T]: the teacher's log-prob of the whole chunk holding each student token: Σ of its
    log-probs of its own tokens of the chunk (``hidden`` [B, L', H] are the teacher's last hidden
    states; with one tokenizer every token is its own chunk, and this is its token log-prob)."""
    if view.teacher_columns is None:
        return scores.token_logprob
    assert view.teacher_targets is not None and view.teacher_chunk is not None
    tok = head_scores(gather_columns(hidden, view.teacher_columns), head, view.teacher_targets,
                      temperature=temperature, entropy=False, vocab_rows=vocab_rows, block=block).token_logprob
    tc = view.teacher_chunk
    sums = per_chunk_sum(tok, tc, max(tc.shape[1], view.targets.shape[1]) + 1)
    return sums.gather(1, view.chunk_ids().clamp_min(0))
