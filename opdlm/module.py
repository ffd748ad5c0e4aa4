"""The on-policy distillation LightningModule (the SFT one is in opdlm/sft.py; both evaluate the
same way, opdlm/evaluation.py). ``training_step`` reads like the algorithm: sample, align, score the
teacher, select the support, mask, loss and backward, optimizer step, log. It never branches on a
plugin's name: the loss declares what it reads (``Loss.reads``) and the step computes exactly that.

On several processes each rank samples and scores its own rollouts; the loss of an optimizer step
is the token mean over the tokens of every rank (the count is summed over ranks, and the loss is
scaled by the world size because data-parallel strategies average gradients). The teacher is not
a submodule: it is moved and cast with the module, but no strategy wraps, shards or checkpoints it,
and no optimizer sees it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from opdlm import dist
from opdlm.build import BuiltRun
from opdlm.evaluation import GenerationEval, eval_modes, sampler_kwargs
from opdlm.guard import StepGuard, guarded_step
from opdlm.models import load_or_build, render_prompt
from opdlm.ops.aggregate import aggregation
from opdlm.ops.batch import full_support, micro_batch_rows, mini_batch_rows, take
from opdlm.ops.diagnostics import loss_diagnostics, rollout_diagnostics
from opdlm.ops.extra_scores import FirstByteBins, chunk_logprob
from opdlm.ops.fullvocab import full_vocab_loss
from opdlm.ops.head import gather_columns, head_scores, lookup_logits, model_hidden, response_hidden, split_model
from opdlm.ops.lean import trained_scores
from opdlm.optim import make_optimizer
from opdlm.reads import checked_output
from opdlm.types import Example, LossInputs, LossOutput, Rollout, Scores, Support, TeacherView
from opdlm.xtok.tables import N_BINS

__all__ = ["OPDModule"]


class OPDModule(GenerationEval):
    """On-policy distillation: the student learns from a frozen teacher on its own rollouts."""

    def __init__(self, config: dict[str, Any], student_init: str | None = None,
                 teacher_init: str | dict[str, str] | None = None, *, built: BuiltRun | None = None,
                 student: nn.Module | None = None, teacher: nn.Module | dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config, "student_init": student_init, "teacher_init": teacher_init})
        if built is None:
            from opdlm.build import build_run
            built = build_run(config)
        seed = config["run"]["seed"]
        self.student = student if student is not None else load_or_build(built.student, student_init, seed)
        # one teacher per task in a multi-task run (opdlm.multitask), by label; else one, under ""
        runs = built.tasks or {"": built}
        inits = teacher_init if isinstance(teacher_init, dict) else {label: teacher_init for label in runs}
        given = teacher if isinstance(teacher, dict) else {label: teacher for label in runs}
        teachers = {label: given[label] if given.get(label) is not None else load_or_build(run.teacher, inits[label], seed + 1)
                    for label, run in runs.items()}
        for t in teachers.values():
            t.requires_grad_(False)
            t.eval()
        object.__setattr__(self, "teachers", teachers)  # not submodules (see the module docstring)
        self.runs = runs
        self.top = built
        self.stage = config["stages"]["opd"]
        self.guard = StepGuard("opd", self.stage)
        self.seed = seed
        self.lean = self.stage["head"] == "lean"
        self.automatic_optimization = False
        self.setup_eval(built, eval_modes(config), built.student.node["chat_template"], self.stage["val_every"])
        self._first_byte: dict[str, FirstByteBins] = {}
        self.use(next(iter(runs)))

    def use(self, label: str) -> None:
        """Train on task ``label`` from now on (a multi-task run switches per rollout batch): its run
        (sampler, plugins), its teacher and what the step derives from them."""
        built = self.runs[label]
        self.built, self.task_label = built, label
        object.__setattr__(self, "_teacher", self.teachers[label])
        self.temperature = built.sampler.temperature
        self.reads = built.loss.reads
        self.norm_length = self.stage["loss_norm_length"] or built.sampler.response_budget
        if label not in self._first_byte:
            self._first_byte[label] = FirstByteBins(built.ctx, built.student.n_ids, built.teacher.n_ids)
        self.first_byte = self._first_byte[label]

    @property
    def eval_built(self) -> BuiltRun:
        return self.top

    # -- the algorithm ----------------------------------------------------------------------------
    def training_step(self, batch: Iterable[Example], batch_idx: int) -> None:
        torch.manual_seed(dist.step_seed(self.seed, 3, self.batches_done, self.global_rank))  # this rank's stream
        if self.top.tasks:                                               #    (multi-task: the batch's task)
            self.use(list(batch)[0].meta["task"])
        rollout = self.sample(batch)                                     # 1. sample
        view = self.align(rollout)                                       # 2. align
        student_top = self.student_topk(rollout)                         #    (the student's own top-k, if read)
        teacher = self.score_teacher(view, student_top)                  # 3. score the teacher
        support, teacher = self.select_support(rollout, view, teacher, student_top)  # 4. select the support
        mask = self.mask(rollout, view)                                  # 5. mask
        logs = self.update(rollout, view, teacher, support, mask)       # 6.-7. loss, backward, step(s)
        self.batches_done += 1
        self.log_step(logs, rollout, view)                               # 8. log
        self.save_rollouts(rollout, view, teacher, mask)                 #    (a few, at validation steps)

    def sample(self, batch: Iterable[Example]) -> Rollout:
        batch = list(batch)
        prompts = [render_prompt(self.built.student.tokenizer, ex.prompt, self.chat_template) for ex in batch]
        return self.built.sampler.sample(self.student, self.built.student.tokenizer, prompts, batch,
                                         **sampler_kwargs(self.built.sampler, self.chat_template))

    def align(self, rollout: Rollout) -> TeacherView:
        teacher = self.built.teacher
        prompts = [render_prompt(teacher.tokenizer, ex.prompt, teacher.node["chat_template"]) for ex in rollout.examples]
        aligner = self.built.aligner
        if rollout.outcomes is not None and aligner.uses_teacher_prompt:  # the teacher's own user turns
            from opdlm.conversation import Conversation
            conv, task = Conversation(teacher.tokenizer, teacher.node["chat_template"]), self.built.task
            turns = [[conv.user(task.user_turn(obs)) for _, obs in o.transcript[: o.replies]] for o in rollout.outcomes]
            return aligner.align(rollout, prompts, teacher_turns=turns)
        return aligner.align(rollout, prompts)

    def student_topk(self, rollout: Rollout) -> Scores | None:
        """The student's own top-k without gradients, when the support reads it."""
        if not self.built.support.student_topk:
            return None
        with torch.no_grad():
            return self.score_student(rollout, None, topk=self.built.support.student_topk)

    @torch.no_grad()
    def score_teacher(self, view: TeacherView, student_top: Scores | None = None) -> Scores:
        """The teacher's Scores at the student's positions from one pass of its head per block of
        positions: the sampled token's log-prob, log-sum-exp, entropy, its top-k (as many as the
        support needs), its logits on the student's own top-k when the support reads that
        (Scores.support_logits), and what the loss declares besides (first-byte marginals, chunk
        log-probs). Its hidden states are kept (Scores.hidden)."""
        hidden, head = model_hidden(self.teacher, view.input_ids, view.attention_mask, view.position_ids)
        feats = gather_columns(hidden, view.pred_columns)
        kw = dict(temperature=self.temperature, vocab_rows=self.built.teacher.n_ids, block=self.stage["teacher_head_block"])
        scores = head_scores(feats, head, view.targets, support_ids=self._extra_ids(student_top),
                             topk=self.built.support.teacher_topk, entropy=True, **self._buckets("teacher"), **kw)
        scores = dataclasses.replace(scores, hidden=feats)
        if self.reads.reads("teacher", "chunk_logprob"):
            scores = dataclasses.replace(scores, chunk_logprob=chunk_logprob(scores, hidden, head, view, **kw))
        return scores

    def select_support(self, rollout: Rollout, view: TeacherView, teacher: Scores,
                       student_top: Scores | None = None) -> tuple[Support, Scores]:
        """The support, and the teacher's Scores with its logits on the support when the loss reads
        them: read from the teacher's pass (its top-k, the extra ids, the sampled token); a support
        holding other ids costs a second pass over those ids."""
        if self.reads.vocabulary == "full":
            support = full_support(rollout.targets, self.built.student.n_ids)
            if self.lean and split_model(self.student) is not None:  # the loss path runs the teacher's head
                #                                                     block by block (else: the naive path)
                return support, teacher
        else:
            support = self.built.support.select(teacher, student_top, rollout, view)
        if not self.reads.reads("teacher", "support_logits"):
            return support, dataclasses.replace(teacher, support_logits=None)
        t_ids = support.teacher_ids if support.teacher_ids is not None else support.ids
        logits = None
        if self.reads.vocabulary == "support":  # (a whole vocabulary is never among what the pass read)
            logits = self._teacher_logits_from_pass(teacher, view, t_ids, support.valid, self._extra_ids(student_top))
        if logits is None:  # ids the first pass did not read: a second pass
            with torch.no_grad():
                _, t_head = split_model(self.teacher) or (None, None)
                logits = head_scores(teacher.hidden, t_head, view.targets, temperature=self.temperature,
                                     support_ids=t_ids, entropy=False, vocab_rows=self.built.teacher.n_ids,
                                     block=self.stage["teacher_head_block"]).support_logits
        return support, dataclasses.replace(teacher, support_logits=logits)

    def mask(self, rollout: Rollout, view: TeacherView) -> Tensor:
        """Response tokens at the positions the loss reads, and what every masker keeps."""
        mask = rollout.response_mask & view.positions(self.reads.positions)
        for m in self.built.maskers:
            mask &= m.mask(rollout, view)
        return mask

    def update(self, rollout: Rollout, view: TeacherView, teacher: Scores, support: Support, mask: Tensor,
               optimizer: Any = None, scheduler: Any = None) -> dict[str, list[Tensor]]:
        """Loss, backward and optimizer step(s) on one rollout batch: ``mini_batches`` (a count)
        optimizer steps on strided row sets (later ones are off-policy against π_old), each
        accumulating ``micro_batches`` (a count) backward passes, the loss aggregated over the whole
        mini-batch on every rank (``loss_aggregation``). Outside a fit, pass the optimizer (and the scheduler)."""
        st, world = self.stage, self._world()
        opt = optimizer if optimizer is not None else self.optimizers()
        sched = scheduler if scheduler is not None or optimizer is not None else self.lr_schedulers()
        old_logprob = None
        if st["mini_batches"] > 1:  # later mini-batches are off-policy: keep π_old from before the first update
            with torch.no_grad():
                old_logprob = self.score_student(rollout, None).token_logprob
        logs: dict[str, list[Tensor]] = {}
        all_sum = dist.all_sum if world > 1 else (lambda x: x)
        terms = {f"loss.terms.{i} ({part.plugin_name})": f"{i}_{part.plugin_name}/loss"
                 for i, part in enumerate(self.built.loss.parts())}  # weighted_sum's terms, named in a stop
        for m, rows in enumerate(mini_batch_rows(rollout.input_ids.shape[0], st["mini_batches"])):
            weights, denominator = aggregation(mask[rows.to(mask.device)], st["loss_aggregation"],
                                               norm_length=self.norm_length, all_sum=all_sum)
            loss, term_losses = torch.zeros((), device=self.device), {name: torch.zeros((), device=self.device) for name in terms}
            for micro in micro_batch_rows(rows, st["micro_batches"]):
                old = take(old_logprob, micro) if old_logprob is not None else None
                within = torch.searchsorted(rows.to(micro.device), micro)  # the micro-batch's rows in `weights`
                inputs, out, part = self.loss_backward(take(rollout, micro), take(support, micro), take(teacher, micro),
                                                       old, take(mask, micro), take(view, micro),
                                                       denominator * (1.0 / world), take(weights, within))
                loss = loss + part
                for name, stat in terms.items():
                    term_losses[name] = term_losses[name] + out.stats[stat].detach()
                for k, v in loss_diagnostics(inputs, out.token_loss, out.stats, st["gap_buckets"]).items():
                    logs.setdefault(k, []).append(v)
            logs.setdefault("grad_norm", []).append(guarded_step(
                self, opt, sched, self.student.parameters(), st["max_grad_norm"], loss,
                f"the loss ({self.built.loss.plugin_name})", term_losses, batch_start=m == 0))
        if sched is not None:
            logs["lr"] = [torch.tensor(sched.get_last_lr()[0])]
        if self.guard.mode == "skip":
            logs["skipped_steps"] = [torch.tensor(float(self.guard.skipped))]
        return logs

    def loss_backward(self, ro: Rollout, sup: Support, teacher: Scores, old: Tensor | None, mask: Tensor,
                      view: TeacherView, denominator: Tensor,
                      weights: Tensor | None = None) -> tuple[LossInputs, LossOutput, Tensor]:
        """The student's scores (naive or lean head), the loss Σ weights·ℓ / ``denominator`` (the
        step's aggregation, opdlm.ops.aggregate; weights default to the mask) and one backward pass
        through head and body.
        Returns the loss inputs and output (for the log) and the loss (detached)."""
        feats, head = response_hidden(self.student, ro.input_ids, ro.attention_mask, ro.position_ids, self._cols(ro))
        if self.lean and head is None:
            self._warn_no_split()
        self._phase("loss_path_start")
        loss = self.built.loss
        full_lean = self.lean and head is not None and self.reads.vocabulary == "full"
        if full_lean:  # both models' heads block by block, the loss's divergence inside
            assert teacher.hidden is not None
            token_loss, student = full_vocab_loss(
                feats, head, teacher.hidden, (split_model(self.teacher) or (None, None))[1], ro.targets,
                loss.divergence, student_rows=self.built.student.n_ids, teacher_rows=self.built.teacher.n_ids,
                temperature=self.temperature, block=self.stage["student_head_block"])
        else:
            support_ids = sup.ids if self.reads.reads("student", "support_logits") else None
            student = trained_scores(feats, head, ro.targets, lean=self.lean, block=self.stage["student_head_block"],
                                     support_ids=support_ids, temperature=self.temperature,
                                     vocab_rows=self.built.student.n_ids, entropy=True, **self._buckets("student"))
        inputs = LossInputs(student=student, teacher=teacher, support=sup, mask=mask, rollout=ro, view=view,
                            old_logprob=old if old is not None else student.token_logprob.detach())
        out = LossOutput(token_loss) if full_lean else checked_output(loss, loss.compute(inputs), mask)
        w = (mask if weights is None else weights).to(out.token_loss.dtype)
        scalar = (out.token_loss * w).sum() / denominator.to(out.token_loss.dtype)
        self._backward(scalar)
        self._phase("loss_path_end")
        return inputs, out, scalar.detach()

    def log_step(self, logs: dict[str, list[Tensor]], rollout: Rollout, view: TeacherView) -> None:
        """Log the step's diagnostics (means over micro-batches; on several processes, the mean of
        the values of the ranks that have one, except ``tokens``, the sum over ranks). A rank can
        lack a mean (no counted token in its rollouts), so the ranks first agree on the keys and
        reduce them all in one collective: per-key reductions of different key sets would pair
        wrong values or wait forever."""
        logs.update({k: [v] for k, v in rollout_diagnostics(rollout, view, self.built.student.tokenizer).items()})
        world = self._world()
        values = {}
        for k, vs in logs.items():
            v = torch.stack([x.float().detach().to(self.device) for x in vs])
            values[k] = v.sum() if k == "tokens" else v.mean()
        if world > 1:
            keys = dist.all_keys(list(values))
            zero = torch.zeros((), device=self.device)
            pairs = torch.stack([torch.stack([values.get(k, zero), zero + (k in values)]) for k in keys])
            pairs = dist.all_sum(pairs)
            values = {k: s if k == "tokens" else s / n for k, (s, n) in zip(keys, pairs) if n > 0}
        for k, v in values.items():
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "grad_norm"), batch_size=rollout.input_ids.shape[0])
            if self.top.tasks and (k in ("loss", "logprob_gap") or k.startswith("episode/")):  # per task too
                self.log(f"train/{self.task_label}/{k}", v, batch_size=rollout.input_ids.shape[0])

    def save_rollouts(self, rollout: Rollout, view: TeacherView, teacher: Scores, mask: Tensor) -> None:
        """At validation steps, the first ``log_rollouts`` rollouts of rank 0, token by token
        (opdlm.rollout_log), into ``rollout_dir`` (set by the runner; None: not saved)."""
        n, folder = self.stage["log_rollouts"], getattr(self, "rollout_dir", None)
        if not n or folder is None or self.global_rank != 0 or not self.val_every or self.batches_done % self.val_every:
            return
        from opdlm.rollout_log import rollout_records, write_records
        rows = torch.arange(min(n, rollout.input_ids.shape[0]))
        ro = take(rollout, rows)
        with torch.no_grad():
            student_lp = self.score_student(ro, None).token_logprob
        write_records(folder, self.batches_done, rollout_records(
            self.batches_done, ro, take(view, rows), take(teacher, rows), student_lp, take(mask, rows),
            self.built.student.tokenizer, self.built.teacher.tokenizer, len(rows)))

    # -- scores the step reads ---------------------------------------------------------------------
    def score_student(self, ro: Rollout, support_ids: Tensor | None, topk: int = 0,
                      first_byte: bool | None = None) -> Scores:
        """The student's Scores (with gradients when enabled: the naive head path). ``first_byte``:
        whether to add the first-byte marginals (default: when the loss reads them)."""
        feats, head = response_hidden(self.student, ro.input_ids, ro.attention_mask, ro.position_ids, self._cols(ro))
        # without gradients (old log-probs, the student's own top-k) the lean setting walks blocks here too
        block = self.stage["student_head_block"] if self.lean and not torch.is_grad_enabled() else None
        return head_scores(feats, head, ro.targets, temperature=self.temperature, support_ids=support_ids,
                           topk=topk, entropy=True, vocab_rows=self.built.student.n_ids, block=block,
                           **self._buckets("student", first_byte))

    def _buckets(self, side: str, need: bool | None = None) -> dict[str, Any]:
        """head_scores' first-byte bins for one side, when the loss reads its byte_logprobs."""
        if not (self.reads.reads(side, "byte_logprobs") if need is None else need):
            return {}
        return {"buckets": self.first_byte(side, self.device), "n_buckets": N_BINS}

    @staticmethod
    def _cols(ro: Rollout) -> Tensor:
        """[B, T]: the columns whose hidden states predict each response token."""
        cols = torch.arange(ro.prompt_len - 1, ro.input_ids.shape[1] - 1, device=ro.input_ids.device)
        return cols.expand(ro.input_ids.shape[0], -1)

    def _extra_ids(self, student_top: Scores | None) -> Tensor | None:
        """Ids whose teacher logits the teacher's pass also reads: the student's own top-k (one
        vocabulary on both sides), which supports may add to the teacher's top-k."""
        if student_top is None or not self.built.aligner.shared_vocabulary:
            return None
        return student_top.topk_ids

    @staticmethod
    def _teacher_logits_from_pass(teacher: Scores, view: TeacherView, ids: Tensor, valid: Tensor,
                                  extra_ids: Tensor | None) -> Tensor | None:
        """The teacher's logits on ``ids`` [B, T, K] from what its pass computed, or None if some
        valid id is not among them."""
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

    def prepare(self, rollout: Rollout) -> tuple[TeacherView, Scores, Support, Tensor]:
        """Steps 2-5 at once (align, score the teacher, select the support, mask): everything the
        loss reads besides the student's own scores. For tests and benchmarks."""
        view = self.align(rollout)
        student_top = self.student_topk(rollout)
        teacher = self.score_teacher(view, student_top)
        support, teacher = self.select_support(rollout, view, teacher, student_top)
        return view, teacher, support, self.mask(rollout, view)

    # -- plumbing -----------------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    @property
    def eval_model(self) -> nn.Module:
        return self.student

    @property
    def eval_tokenizer(self) -> Any:
        return self.built.student.tokenizer

    def _apply(self, fn: Any, recurse: bool = True) -> OPDModule:
        super()._apply(fn, recurse)
        for t in self.teachers.values():
            t._apply(fn, recurse)  # .to(device), .double(), precision plugins' casts
        return self

    def on_fit_start(self) -> None:
        for t in self.teachers.values():
            t.to(self.device)

    def configure_optimizers(self) -> Any:
        return make_optimizer(self, self.student.parameters(), self.stage)

    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _phase(self, name: str) -> None:
        """A hook for benchmarks (memory and time per phase); does nothing by default."""
        hook = getattr(self, "phase_hook", None)
        if hook is not None:
            hook(name)

    def _backward(self, t: Tensor) -> None:
        """Lightning's manual_backward inside a fit (strategies hook it); plain autograd outside."""
        if self._trainer is not None:
            self.manual_backward(t)
        else:
            t.backward()

    def _warn_no_split(self) -> None:
        if not getattr(self, "_warned_split", False):
            from lightning.pytorch.utilities import rank_zero_warn
            rank_zero_warn("stages.opd.head=lean: the student's output head cannot be separated from its body "
                          f"({type(self.student).__name__}: logit scaling or soft-capping, or an unknown layout); "
                          "using the naive head path")
            self._warned_split = True
