"""The scores an OPD step reads, for one task of the run: the teacher's pass over the aligned tokens,
the support and the teacher's logits on it, and the student's scores (without gradients, or with
them on the naive or lean head). Each is computed exactly as the task's loss declares
(Loss.reads): nothing a loss does not read is computed.

The step is: ``student_own_topk`` (only when the support reads the student's top-k),
``teacher_scores``, ``select_support``, ``teacher_support_logits``; then the loss path in
opdlm.module. Everything here reads the task's sampler temperature and vocabularies and the OPD
stage's head blocks (``Scorer``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from opdlm.builder import TaskRun
from opdlm.ops.batch import full_support
from opdlm.ops.extra_scores import FirstByteBins, chunk_logprob
from opdlm.ops.head import gather_columns, head_scores, lookup_logits, model_hidden, response_hidden, split_model
from opdlm.served import ServedTeacher
from opdlm.types import Rollout, Scores, Support, TeacherView
from opdlm.xtok.tables import N_BINS


class Scorer:
    """The scores of one task's steps: its teacher and student vocabularies, its sampler's
    temperature, what its loss reads, and the stage's head blocks (``stage``: stages.opd)."""

    def __init__(self, task: TaskRun, student_n_ids: int, stage: dict[str, Any]) -> None:
        self.task, self.stage = task, stage
        self.temperature = task.sampler.temperature
        self.reads = task.loss.reads
        self.lean = stage["head"] == "lean"
        self.bins = FirstByteBins(task.ctx, student_n_ids, task.teacher.n_ids)
        self.student_n_ids = student_n_ids

    def student_own_topk(self, student: nn.Module, rollout: Rollout) -> Scores | None:
        """The student's own top-k without gradients, when the support reads it."""
        k = self.task.support.student_k
        if not k or self.reads.vocabulary == "full":
            return None
        with torch.no_grad():
            return self.student_scores(student, rollout, None, topk=k)

    def full_vocab_path(self, student: nn.Module | None, teacher: nn.Module) -> str | None:
        """Where a full-vocabulary loss reads the teacher's logits (None for a support loss):
        'loss' (the lean head with a split teacher: the loss's pass runs the teacher's head, block by
        block, and the teacher's phase only its body), 'hidden' (the lean head, a teacher whose head
        cannot be split: its logits are kept as Scores.hidden) or 'pass' (the naive head: the
        teacher's pass keeps its logits on the student's ids as Scores.support_logits)."""
        if self.reads.vocabulary != "full":
            return None
        if not (self.lean and student is not None and split_model(student) is not None):
            return "pass"
        return "loss" if not isinstance(teacher, ServedTeacher) and split_model(teacher) is not None else "hidden"

    @torch.no_grad()
    def teacher_scores(self, teacher: nn.Module, view: TeacherView, student_top: Scores | None = None,
                       student: nn.Module | None = None) -> Scores:
        """The teacher's Scores at the student's positions from one pass of its head per block of
        positions: the sampled token's log-prob, log-sum-exp, entropy, its top-k (as many as the
        support needs), its logits on the student's own top-k when the support reads that
        (Scores.support_logits), and what the loss declares besides (first-byte marginals, chunk
        log-probs). Its hidden states are kept (Scores.hidden). A served teacher (opdlm.served) gives
        the sampled token's log-prob and its top-k (what build's check_served let the loss read).

        A full-vocabulary loss (``full_vocab_path``, given the ``student``) reads no top-k; on the
        naive head the pass keeps the logits themselves, and on the lean head with a split teacher
        only the body runs here: the sampled-token log-prob, log-sum-exp and entropy are NaN until
        the loss's pass fills them (OPDModule.update)."""
        if isinstance(teacher, ServedTeacher):
            return teacher.scores(view, self.task.support.teacher_k, self.temperature)
        path = self.full_vocab_path(student, teacher)
        hidden, head = model_hidden(teacher, view.input_ids, view.attention_mask, view.position_ids)
        feats = gather_columns(hidden, view.pred_columns)
        if path == "loss":
            nan = torch.full(view.targets.shape, float("nan"), device=feats.device)
            return Scores(token_logprob=nan, lse=nan.clone(), entropy=nan.clone(), hidden=feats)
        kw = dict(temperature=self.temperature, vocab_rows=self.task.teacher.n_ids, block=self.stage["teacher_head_block"])
        scores = head_scores(feats, head, view.targets, support_ids=self.extra_ids(student_top),
                             topk=0 if path else self.task.support.teacher_k, entropy=True,
                             keep_logits=self.student_n_ids if path == "pass" else 0,
                             **self.buckets("teacher", view.targets.device), **kw)
        scores = dataclasses.replace(scores, hidden=feats)
        if self.reads.has("teacher", "chunk_logprob"):
            scores = dataclasses.replace(scores, chunk_logprob=chunk_logprob(scores, hidden, head, view, **kw))
        return scores

    def select_support(self, rollout: Rollout, view: TeacherView, teacher: Scores,
                       student_top: Scores | None = None) -> Support:
        """The token set compared at each position: the support plugin's, or the whole vocabulary
        for a full-vocabulary loss."""
        if self.reads.vocabulary == "full":
            return full_support(rollout.targets, self.student_n_ids)
        return self.task.support.select(teacher, student_top, rollout, view)

    def teacher_support_logits(self, teacher_model: nn.Module, view: TeacherView, teacher: Scores, support: Support,
                               student_top: Scores | None = None, student: nn.Module | None = None) -> Scores:
        """The teacher's Scores with its logits on the support when the loss reads them (else
        without any): read from the teacher's pass (its top-k, the extra ids, the sampled token); a
        support holding other ids costs a second pass over those ids. A full-vocabulary loss has
        them from the teacher's pass (the naive head) or reads them block by block itself
        (opdlm.ops.fullvocab)."""
        if self.reads.vocabulary == "full":
            return teacher
        if not self.reads.has("teacher", "support_logits"):
            return dataclasses.replace(teacher, support_logits=None)
        t_ids = support.teacher_ids if support.teacher_ids is not None else support.ids
        logits = None
        if self.reads.vocabulary == "support":  # (a whole vocabulary is never among what the pass read)
            logits = _logits_from_pass(teacher, view, t_ids, support.valid, self.extra_ids(student_top))
        if logits is None and isinstance(teacher_model, ServedTeacher):
            raise RuntimeError("a served teacher's support logits must come from its top-k and the sampled token "
                               "(build's check_served)")
        if logits is None:  # ids the first pass did not read: a second pass
            with torch.no_grad():
                _, t_head = split_model(teacher_model) or (None, None)
                logits = head_scores(teacher.hidden, t_head, view.targets, temperature=self.temperature,
                                     support_ids=t_ids, entropy=False, vocab_rows=self.task.teacher.n_ids,
                                     block=self.stage["teacher_head_block"]).support_logits
        return dataclasses.replace(teacher, support_logits=logits)

    def student_scores(self, student: nn.Module, ro: Rollout, support_ids: Tensor | None, topk: int = 0,
                       first_byte: bool | None = None) -> Scores:
        """The student's Scores (with gradients when enabled: the naive head path; without them, no
        entropy: the old log-probs and the student's own top-k do not read it). ``first_byte``:
        whether to add the first-byte marginals (default: when the loss reads them)."""
        feats, head = response_hidden(student, ro.input_ids, ro.attention_mask, ro.position_ids, response_columns(ro))
        # without gradients (old log-probs, the student's own top-k): blocks of a no-grad pass, as the teacher's
        block = self.stage["teacher_head_block"] or None if not torch.is_grad_enabled() else None
        return head_scores(feats, head, ro.targets, temperature=self.temperature, support_ids=support_ids,
                           topk=topk, entropy=torch.is_grad_enabled(), vocab_rows=self.student_n_ids, block=block,
                           **self.buckets("student", ro.targets.device, first_byte))

    def buckets(self, side: str, device: torch.device, need: bool | None = None) -> dict[str, Any]:
        """head_scores' first-byte bins for one side, when the loss reads its byte_logprobs."""
        if not (self.reads.has(side, "byte_logprobs") if need is None else need):
            return {}
        return {"buckets": self.bins(side, device), "n_buckets": N_BINS}

    def extra_ids(self, student_top: Scores | None) -> Tensor | None:
        """Ids whose teacher logits the teacher's pass also reads: the student's own top-k (one
        vocabulary on both sides), which supports may add to the teacher's top-k."""
        if student_top is None or not self.task.aligner.shared_vocabulary:
            return None
        return student_top.topk_ids


def response_columns(ro: Rollout) -> Tensor:
    """[B, T]: the columns whose hidden states predict each response token."""
    cols = torch.arange(ro.prompt_len - 1, ro.input_ids.shape[1] - 1, device=ro.input_ids.device)
    return cols.expand(ro.input_ids.shape[0], -1)


def _logits_from_pass(teacher: Scores, view: TeacherView, ids: Tensor, valid: Tensor,
                      extra_ids: Tensor | None) -> Tensor | None:
    """The teacher's logits on ``ids`` [B, T, K] from what its pass computed, or None if some valid
    id is not among them."""
    cand_ids = [view.targets.clamp_min(0).unsqueeze(-1)]
    cand = [(teacher.token_logprob + teacher.lse).unsqueeze(-1)]
    if teacher.topk_ids is not None and teacher.topk_logits is not None:
        cand_ids.append(teacher.topk_ids)
        cand.append(teacher.topk_logits)
    if teacher.support_logits is not None and extra_ids is not None:
        cand_ids.append(extra_ids)
        cand.append(teacher.support_logits)
    logits, found = lookup_logits(ids, torch.cat(cand_ids, -1), torch.cat(cand, -1))
    return logits if bool((found | ~valid).all()) else None
