"""The on-policy distillation LightningModule (the SFT one is in opdlm/sft.py; both evaluate the
same way, opdlm/evaluation.py). ``training_step`` reads like the algorithm: take the batch's task,
sample, prepare what the loss reads (align, score the teacher, select the support, mask), loss and
backward, optimizer step, log. It never branches on a plugin's name: the task's loss declares what
it reads (``Loss.reads``) and the step computes exactly that (opdlm.scoring).

A run is a set of tasks (one by default); each rollout batch holds one task, sampled with its
sampler and scored by its teacher. On several processes each rank samples and scores its own
rollouts; the loss of an optimizer step is the token mean over the tokens of every rank (the count
is summed over ranks, and the loss is scaled by the world size because data-parallel strategies
average gradients). The teachers are not submodules: they are moved and cast with the module, but
no strategy wraps, shards or checkpoints them, and no optimizer sees them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from opdlm import dist
from opdlm.builder import BuiltRun, TaskRun, build_run
from opdlm.conversation import Conversation
from opdlm.data import PromptBatch
from opdlm.evaluation import GenerationEval, eval_modes, sampler_kwargs
from opdlm.guard import StepGuard, checkpoint_now, guarded_step
from opdlm.models import load_or_build, render_prompt
from opdlm.ops.aggregate import aggregation
from opdlm.ops.batch import micro_batch_rows, mini_batch_rows, take
from opdlm.ops.diagnostics import loss_diagnostics, reduce_step_log
from opdlm.ops.fullvocab import full_vocab_loss
from opdlm.ops.head import response_hidden, split_model
from opdlm.ops.lean import trained_scores
from opdlm.optim import make_optimizer
from opdlm.reads import checked_output
from opdlm.rollout_log import save_rollouts
from opdlm.scoring import Scorer, response_columns
from opdlm.served import ServedTeacherError
from opdlm.shard import is_sharded, plain_class
from opdlm.types import LossInputs, LossOutput, Rollout, Scores, Support, TeacherView

__all__ = ["OPDModule"]


class OPDModule(GenerationEval):
    """On-policy distillation: the student learns from a frozen teacher on its own rollouts."""

    def __init__(self, config: dict[str, Any], student_init: str | None = None,
                 teacher_init: str | dict[str, str] | None = None, *, built: BuiltRun | None = None,
                 student: nn.Module | None = None, teacher: nn.Module | dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config, "student_init": student_init, "teacher_init": teacher_init})
        run = built if built is not None else build_run(config)
        seed = config["run"]["seed"]
        self.student = student if student is not None else load_or_build(run.student, student_init, seed)
        inits = teacher_init if isinstance(teacher_init, dict) else {label: teacher_init for label in run.tasks}
        given = teacher if isinstance(teacher, dict) else {label: teacher for label in run.tasks}
        teachers = {label: given[label] if given.get(label) is not None else load_or_build(t.teacher, inits.get(label), seed + 1)
                    for label, t in run.tasks.items()}
        for t in teachers.values():
            t.requires_grad_(False)
            t.eval()
        object.__setattr__(self, "teachers", teachers)  # not submodules (see the module docstring)
        self.stage = config["stages"]["opd"]
        self.guard = StepGuard("opd", self.stage)
        self.seed = seed
        self.lean = self.stage["head"] == "lean"
        self.automatic_optimization = False
        self.setup_eval(run, eval_modes(config), run.student.node["chat_template"], self.stage["val_every"])
        self.scorers = {label: Scorer(t, run.student.n_ids, self.stage) for label, t in run.tasks.items()}
        self.rollout_dir = None  # where rank 0 saves a few rollouts at validation steps (set by the runner)
        self.rollout_dir_set = False  # whether the runner set it (on rank 0; the other ranks: None)

    # -- the algorithm ----------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        torch.manual_seed(dist.step_seed(self.seed, 3, self.batches_done, self.global_rank))  # this rank's stream
        task = self.run.tasks[batch.label]                                          # the batch's task
        rollout = self.sample(batch.examples, task)                                 # 1. sample
        view, teacher_scores, support, mask = self.prepare_or_stop(rollout, task)   # 2.-5. align, teacher, support, mask
        logs = self.update(rollout, view, teacher_scores, support, mask, task=task)  # 6.-7. loss, backward, step(s)
        self.batches_done += 1
        self.log_step(logs, rollout, view, task)                                    # 8. log
        # (a sharded student's forward is collective: every rank scores, rank 0 writes)
        logging = self.rollout_dir is not None or (self.rollout_dir_set and is_sharded(self.student))
        if logging and self.val_every and self.batches_done % self.val_every == 0:
            save_rollouts(self.rollout_dir, self.batches_done, self.stage["log_rollouts"], rollout, view, teacher_scores,
                          mask, lambda ro: self.score_student(ro, None, task=task).token_logprob,
                          self.run.student.tokenizer, task.teacher.tokenizer)  #    (a few, token by token)

    def sample(self, examples: list, task: TaskRun | None = None) -> Rollout:
        task = task or self.run.only
        prompts = [render_prompt(self.run.student.tokenizer, ex.prompt, self.chat_template) for ex in examples]
        return task.sampler.sample(self.student, self.run.student.tokenizer, prompts, examples,
                                   **sampler_kwargs(task.sampler, self.chat_template))

    def prepare(self, rollout: Rollout, task: TaskRun | None = None) -> tuple[TeacherView, Scores, Support, Tensor]:
        """Steps 2-5: align, score the teacher, select the support (and the teacher's logits on it),
        mask: everything the loss reads besides the student's own scores."""
        task = task or self.run.only
        scorer, teacher = self.scorer(task), self.teachers[task.label]
        view = self.align(rollout, task)
        student_top = scorer.student_own_topk(self.student, rollout)
        scores = scorer.teacher_scores(teacher, view, student_top, self.student)
        support = scorer.select_support(rollout, view, scores, student_top)
        scores = scorer.teacher_support_logits(teacher, view, scores, support, student_top, self.student)
        return view, scores, support, self.mask(rollout, view, task)

    def prepare_or_stop(self, rollout: Rollout, task: TaskRun) -> tuple[TeacherView, Scores, Support, Tensor]:
        """prepare; a served teacher that does not answer (after its retries) on any rank stops the
        run on every rank alike, with a checkpoint of the weights before this step."""
        failed: ServedTeacherError | None = None
        try:
            prepared = self.prepare(rollout, task)
        except ServedTeacherError as e:
            failed = e
        if task.teacher.served and self._world() > 1:
            if int(dist.all_sum(torch.tensor([float(failed is not None)], device=self.device)).item()) and failed is None:
                failed = ServedTeacherError("the teacher's server did not answer another process")
        if failed is None:
            return prepared
        path = checkpoint_now(self)
        how = (f"{path} holds the weights from before this step; once the server answers, the same command continues "
               f"from it" if path else "no checkpoint is kept (run.checkpoints is off), so the same command starts the "
                                       "stage again")
        step = f"optimizer step {self.trainer.global_step + 1} of {self.guard.steps}"
        raise ServedTeacherError(f"stage opd, {step}: {failed}. {how}") from None

    def align(self, rollout: Rollout, task: TaskRun | None = None) -> TeacherView:
        task = task or self.run.only
        spec = task.teacher
        prompts = [render_prompt(spec.tokenizer, ex.prompt, spec.node["chat_template"]) for ex in rollout.examples]
        if rollout.outcomes is not None and task.aligner.uses_teacher_prompt:  # the teacher's own user turns
            conv = Conversation(spec.tokenizer, spec.node["chat_template"])
            turns = [[conv.user(task.task.user_turn(obs)) for _, obs in o.transcript[: o.replies]] for o in rollout.outcomes]
            return task.aligner.align(rollout, prompts, teacher_turns=turns)
        return task.aligner.align(rollout, prompts)

    def mask(self, rollout: Rollout, view: TeacherView, task: TaskRun | None = None) -> Tensor:
        """Response tokens at the positions the loss reads, and what every masker keeps."""
        task = task or self.run.only
        mask = rollout.response_mask & view.positions(task.loss.reads.positions)
        for m in task.maskers:
            mask &= m.mask(rollout, view)
        return mask

    def update(self, rollout: Rollout, view: TeacherView, teacher_scores: Scores, support: Support, mask: Tensor,
               optimizer: Any = None, scheduler: Any = None, task: TaskRun | None = None) -> dict[str, list[Tensor]]:
        """Loss, backward and optimizer step(s) on one rollout batch: ``num_mini_batches`` (a count)
        optimizer steps on strided row sets (later ones are off-policy against π_old), each
        accumulating ``num_micro_batches`` (a count) backward passes, the loss aggregated over the whole
        mini-batch on every rank (``loss_aggregation``). Outside a fit, pass the optimizer (and the scheduler)."""
        task = task or self.run.only
        st, world, scorer = self.stage, self._world(), self.scorer(task)
        opt = optimizer if optimizer is not None else self.optimizers()
        sched = scheduler if scheduler is not None or optimizer is not None else self.lr_schedulers()
        old_logprob = None
        if st["num_mini_batches"] > 1:  # later mini-batches are off-policy: keep π_old from before the first update
            with torch.no_grad():
                old_logprob = scorer.student_scores(self.student, rollout, None).token_logprob
        logs: dict[str, list[Tensor]] = {}
        all_sum = dist.all_sum if world > 1 else (lambda x: x)
        norm_length = self.norm_length(task)
        terms = {f"loss.terms.{i} ({part.plugin_name})": f"{i}_{part.plugin_name}/loss"
                 for i, part in enumerate(task.loss.parts())}  # weighted_sum's terms, named in a stop
        for m, rows in enumerate(mini_batch_rows(rollout.input_ids.shape[0], st["num_mini_batches"])):
            weights, denominator = aggregation(mask[rows.to(mask.device)], st["loss_aggregation"],
                                               norm_length=norm_length, all_sum=all_sum)
            loss, term_losses = torch.zeros((), device=self.device), {name: torch.zeros((), device=self.device) for name in terms}
            for micro in micro_batch_rows(rows, st["num_micro_batches"]):
                old = take(old_logprob, micro) if old_logprob is not None else None
                within = torch.searchsorted(rows.to(micro.device), micro)  # the micro-batch's rows in `weights`
                inputs, out, part = self.loss_backward(take(rollout, micro), take(support, micro), take(teacher_scores, micro),
                                                       old, take(mask, micro), take(view, micro),
                                                       denominator * (1.0 / world), take(weights, within), task=task)
                if scorer.full_vocab_path(self.student, self.teachers[task.label]) == "loss":  # the loss's pass
                    for name in ("token_logprob", "lse", "entropy"):  # made the teacher's scores: keep them
                        getattr(teacher_scores, name)[micro.to(mask.device)] = getattr(inputs.teacher, name)
                loss = loss + part
                for name, stat in terms.items():
                    term_losses[name] = term_losses[name] + out.stats[stat].detach()
                for k, v in loss_diagnostics(inputs, out.token_loss, out.stats, st["gap_buckets"]).items():
                    logs.setdefault(k, []).append(v)
            logs.setdefault("grad_norm", []).append(guarded_step(
                self, opt, sched, self.student.parameters(), st["max_grad_norm"], loss,
                f"the loss ({task.loss.plugin_name})", term_losses, batch_start=m == 0))
        if sched is not None:
            logs["lr"] = [torch.tensor(sched.get_last_lr()[0])]
        if self.guard.mode == "skip":
            logs["skipped_steps"] = [torch.tensor(float(self.guard.skipped))]
        return logs

    def loss_backward(self, ro: Rollout, sup: Support, teacher_scores: Scores, old: Tensor | None, mask: Tensor,
                      view: TeacherView, denominator: Tensor, weights: Tensor | None = None,
                      task: TaskRun | None = None) -> tuple[LossInputs, LossOutput, Tensor]:
        """The student's body forward (``student_features``), then its head, the loss and one
        backward pass (``head_loss_backward``). Returns the loss inputs and output (for the log) and
        the loss (detached)."""
        feats, head = self.student_features(ro)
        return self.head_loss_backward(feats, head, ro, sup, teacher_scores, old, mask, view, denominator, weights, task)

    def student_features(self, ro: Rollout) -> tuple[Tensor, nn.Linear | None]:
        """The student's hidden states at the columns that predict the response tokens, and its head."""
        return response_hidden(self.student, ro.input_ids, ro.attention_mask, ro.position_ids, response_columns(ro))

    def head_loss_backward(self, feats: Tensor, head: nn.Linear | None, ro: Rollout, sup: Support, teacher_scores: Scores,
                           old: Tensor | None, mask: Tensor, view: TeacherView, denominator: Tensor,
                           weights: Tensor | None = None, task: TaskRun | None = None
                           ) -> tuple[LossInputs, LossOutput, Tensor]:
        """The student's scores from ``feats`` (naive or lean head), the loss Σ weights·ℓ / ``denominator``
        (the step's aggregation, opdlm.ops.aggregate; weights default to the mask) and one backward
        pass through head and body."""
        task = task or self.run.only
        scorer, loss = self.scorer(task), task.loss
        if self.lean and head is None:
            self._warn_no_split()
        w = (mask if weights is None else weights)
        full_lean = self.lean and head is not None and loss.reads.vocabulary == "full"
        if full_lean:  # both models' heads block by block, the loss's divergence and its gradient inside
            assert teacher_scores.hidden is not None
            scalar, token_loss, student, teacher = full_vocab_loss(
                feats, head, teacher_scores.hidden, (split_model(self.teachers[task.label]) or (None, None))[1], ro.targets,
                loss, w.to(torch.float64) / denominator.to(torch.float64), student_rows=self.run.student.n_ids,
                teacher_rows=task.teacher.n_ids, temperature=scorer.temperature, block=self.stage["student_head_block"])
            teacher_scores = dataclasses.replace(teacher_scores, token_logprob=teacher.token_logprob, lse=teacher.lse,
                                                 entropy=teacher.entropy)
        else:
            support_ids = sup.ids if loss.reads.has("student", "support_logits") else None
            student = trained_scores(feats, head, ro.targets, lean=self.lean, block=self.stage["student_head_block"],
                                     support_ids=support_ids, temperature=scorer.temperature,
                                     vocab_rows=self.run.student.n_ids, entropy=True,
                                     **scorer.buckets("student", ro.targets.device))
        inputs = LossInputs(student=student, teacher=teacher_scores, support=sup, mask=mask, rollout=ro, view=view,
                            old_logprob=old if old is not None else student.token_logprob.detach())
        if full_lean:
            out = LossOutput(token_loss)
        else:
            out = checked_output(loss, loss.compute(inputs), mask)
            scalar = (out.token_loss * w.to(out.token_loss.dtype)).sum() / denominator.to(out.token_loss.dtype)
        self._backward(scalar)
        return inputs, out, scalar.detach()

    def log_step(self, logs: dict[str, list[Tensor]], rollout: Rollout, view: TeacherView, task: TaskRun) -> None:
        """Log the step's diagnostics, reduced over micro-batches and ranks (reduce_step_log); a run
        of several tasks also logs the loss, the gap and the episode numbers per task."""
        values = reduce_step_log(logs, rollout, view, self.run.student.tokenizer, self.device, self._world())
        for k, v in values.items():
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "grad_norm"), batch_size=rollout.input_ids.shape[0])
            if self.run.several and (k in ("loss", "logprob_gap") or k.startswith("episode/")):  # per task too
                self.log(f"train/{task.label}/{k}", v, batch_size=rollout.input_ids.shape[0])

    # -- for tests and scripts of one task ---------------------------------------------------------
    def norm_length(self, task: TaskRun | None = None) -> int:
        """seq_mean_token_sum_norm's fixed length: stages.opd.loss_norm_length, or (0) the most tokens
        a rollout of the task can have the loss count (a multi-turn episode: all its actions)."""
        return self.stage["loss_norm_length"] or (task or self.run.only).sampler.response_budget

    def score_student(self, ro: Rollout, support_ids: Tensor | None, topk: int = 0, first_byte: bool | None = None,
                      task: TaskRun | None = None) -> Scores:
        """The student's Scores on a rollout (opdlm.scoring.Scorer.student_scores)."""
        return self.scorer(task or self.run.only).student_scores(self.student, ro, support_ids, topk, first_byte)

    def scorer(self, task: TaskRun | None = None) -> Scorer:
        """The scores of ``task``'s steps (opdlm.scoring; default: the run's only task)."""
        return self.scorers[(task or self.run.only).label]

    # -- plumbing -----------------------------------------------------------------------------------

    @property
    def teacher(self) -> nn.Module:
        """The teacher of a run of one task."""
        return self.teachers[self.run.only.label]

    @property
    def eval_model(self) -> nn.Module:
        return self.student

    @property
    def eval_tokenizer(self) -> Any:
        return self.run.student.tokenizer

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

    def _backward(self, t: Tensor) -> None:
        """Lightning's manual_backward inside a fit (strategies hook it); plain autograd outside."""
        if self._trainer is not None:
            self.manual_backward(t)
        else:
            t.backward()

    def _warn_no_split(self) -> None:
        if not getattr(self, "_warned_split", False):
            why = ("its weights are sharded (FSDP), gathered only inside its forward" if is_sharded(self.student) else
                   "logit scaling or soft-capping, or an unknown layout")
            rank_zero_warn("stages.opd.head=lean: the student's output head cannot be separated from its body "
                           f"({plain_class(self.student).__name__}: {why}); using the naive head path")
            self._warned_split = True
