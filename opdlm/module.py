"""The on-policy distillation LightningModule (the SFT one is in opdlm/sft.py; both evaluate the
same way, opdlm/evaluation.py). The OPD ``training_step`` reads like the algorithm: sample, align, score the teacher,
select the support, mask, loss and backward, optimizer step, log. It never branches on a plugin's
name.

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
from opdlm.build import Plan
from opdlm.evaluation import GenerationEval, eval_modes
from opdlm.models import load_or_build, render_prompt
from opdlm.ops.batch import (
    alignment_stats,
    full_support,
    micro_batch_rows,
    mini_batch_rows,
    per_chunk_sum,
    take,
)
from opdlm.ops.diagnostics import repetition_frac
from opdlm.ops.fullvocab import full_vocab_loss
from opdlm.ops.head import gather_columns, head_scores, lookup_logits, model_hidden, response_hidden, split_model
from opdlm.ops.lean import lean_scores
from opdlm.optim import make_optimizer
from opdlm.registry import PluginError
from opdlm.sft import SFTModule
from opdlm.types import Example, LossInputs, LossOutput, Rollout, Scores, Support, TeacherView, masked_mean
from opdlm.xtok.tables import N_BINS

__all__ = ["OPDModule", "SFTModule", "alignment_stats", "full_support", "load_or_build"]


def checked_output(loss: Any, out: Any, mask: Tensor) -> LossOutput:
    """The loss plugin's output, or a PluginError naming the plugin and its file."""
    token_loss = getattr(out, "token_loss", None)
    if isinstance(out, LossOutput) and isinstance(token_loss, Tensor) and token_loss.shape == mask.shape:
        return out
    import inspect
    where = inspect.getsourcefile(type(loss)) or type(loss).__module__
    got = (f"a token_loss of shape {tuple(token_loss.shape)}" if isinstance(token_loss, Tensor)
           else type(out).__name__ if not isinstance(out, LossOutput) else f"token_loss {type(token_loss).__name__}")
    raise PluginError(f"loss '{loss.plugin_name}' ({where}): compute() returned {got}; it must return "
                      f"LossOutput(token_loss=<tensor of shape {tuple(mask.shape)}>)")


class OPDModule(GenerationEval):
    """On-policy distillation: the student learns from a frozen teacher on its own rollouts."""

    def __init__(self, config: dict[str, Any], student_init: str | None = None,
                 teacher_init: str | None = None, *, plan: Plan | None = None,
                 student: nn.Module | None = None, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config, "student_init": student_init, "teacher_init": teacher_init})
        if plan is None:
            from opdlm.build import build_plan
            plan = build_plan(config)
        seed = config["run"]["seed"]
        self.student = student if student is not None else load_or_build(plan.student, student_init, seed)
        teacher = teacher if teacher is not None else load_or_build(plan.teacher, teacher_init, seed + 1)
        teacher.requires_grad_(False)
        teacher.eval()
        object.__setattr__(self, "_teacher", teacher)  # not a submodule (see the module docstring)
        self.stage = config["stages"]["opd"]
        self.seed = seed
        self.temperature = plan.sampler.temperature
        self.automatic_optimization = False
        self._bin_cache: dict[str, Tensor] = {}
        self.setup_eval(plan, eval_modes(config), plan.student.node["chat_template"], self.stage["val_every"])

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    @property
    def eval_model(self) -> nn.Module:
        return self.student

    @property
    def eval_tokenizer(self) -> Any:
        return self.plan.student.tokenizer

    def _apply(self, fn: Any, recurse: bool = True) -> OPDModule:
        super()._apply(fn, recurse)
        self._teacher._apply(fn, recurse)  # .to(device), .double(), precision plugins' casts
        return self

    def on_fit_start(self) -> None:
        self._teacher.to(self.device)

    def configure_optimizers(self) -> Any:
        return make_optimizer(self, self.student.parameters(), self.stage)

    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    # -- the algorithm ----------------------------------------------------------------------------
    def _bins(self, side: str, need: bool | None = None) -> Tensor | None:
        """First-byte bins per id of one side when the loss reads first-byte marginals."""
        if not (self.plan.loss.needs_first_byte if need is None else need):
            return None
        if side not in self._bin_cache:
            from opdlm.xtok.tables import tables_for
            pt = tables_for(self.plan.ctx)
            rows = self.plan.teacher.output_ids if side == "teacher" else self.plan.student.output_ids
            bins = pt.t_bins if side == "teacher" else pt.s_bins
            self._bin_cache[side] = torch.from_numpy(bins[:rows].copy())
        return self._bin_cache[side].to(self.device)

    @torch.no_grad()
    def score_teacher(self, view: TeacherView, extra_ids: Tensor | None = None) -> Scores:
        """The teacher's Scores at the student's positions from one pass of its head per chunk: the
        sampled token's log-prob, log-sum-exp, its top-k (as many as the support needs), entropy,
        first-byte marginals, and its logits on ``extra_ids`` [B, T, E] (Scores.support_logits; the
        student's own top-k when the support reads it). Its hidden states are kept (Scores.hidden)."""
        hidden, head = model_hidden(self.teacher, view.input_ids, view.attention_mask, view.position_ids)
        feats = gather_columns(hidden, view.pred_columns)
        spec, chunk = self.plan.teacher, self.stage["chunk_size"]
        scores = head_scores(feats, head, view.targets, temperature=self.temperature, support_ids=extra_ids,
                             topk=self.plan.support.teacher_topk, entropy=True, vocab_rows=spec.output_ids,
                             chunk_size=chunk, buckets=self._bins("teacher"), n_buckets=N_BINS)
        scores = dataclasses.replace(scores, hidden=feats)
        if self.plan.loss.needs_chunk_logprob:
            if view.teacher_columns is None:
                chunk_lp = scores.token_logprob
            else:  # Σ of the teacher's token log-probs per chunk (its own tokens: other positions)
                assert view.teacher_targets is not None and view.teacher_chunk is not None
                tok = head_scores(gather_columns(hidden, view.teacher_columns), head, view.teacher_targets,
                                  temperature=self.temperature, entropy=False, vocab_rows=spec.output_ids,
                                  chunk_size=chunk).token_logprob
                tc = view.teacher_chunk
                sums = per_chunk_sum(tok, tc, max(tc.shape[1], view.targets.shape[1]) + 1)
                chunk_lp = sums.gather(1, view.chunk_ids().clamp_min(0))
            scores = dataclasses.replace(scores, chunk_logprob=chunk_lp)
        return scores

    def score_student(self, ro: Rollout, support_ids: Tensor | None, topk: int = 0,
                      first_byte: bool | None = None) -> Scores:
        cols = torch.arange(ro.prompt_len - 1, ro.input_ids.shape[1] - 1, device=ro.input_ids.device)
        cols = cols.expand(ro.input_ids.shape[0], -1)
        feats, head = response_hidden(self.student, ro.input_ids, ro.attention_mask, ro.position_ids, cols)
        # without gradients (old log-probs, the student's own top-k) the lean setting chunks here too
        chunk = self.stage["head_chunk"] if self.stage["head"] == "lean" and not torch.is_grad_enabled() else None
        return head_scores(feats, head, ro.targets, temperature=self.temperature, support_ids=support_ids,
                           topk=topk, entropy=True, vocab_rows=self.plan.student.output_ids,
                           buckets=self._bins("student", first_byte), n_buckets=N_BINS, chunk_size=chunk)

    def training_step(self, batch: Iterable[Example], batch_idx: int) -> None:
        torch.manual_seed(dist.step_seed(self.seed, 3, self.batches_done, self.global_rank))  # this rank's stream
        rollout = self.sample(batch)                                     # 1. sample
        view = self.align(rollout)                                       # 2. align
        student_top = self.student_topk(rollout)                         #    (the student's own top-k, if read)
        teacher = self.score_teacher(view, self._extra_ids(student_top))  # 3. score the teacher
        support, teacher = self.select_support(rollout, view, teacher, student_top)  # 4. select the support
        mask = self.mask(rollout, view)                                  # 5. mask
        logs = self.update(rollout, view, teacher, support, mask)       # 6.-7. loss, backward, step(s)
        self.batches_done += 1
        self.log_step(logs, rollout, view)                               # 8. log

    def sample(self, batch: Iterable[Example]) -> Rollout:
        batch = list(batch)
        prompts = [render_prompt(self.plan.student.tokenizer, ex.prompt, self.chat_template) for ex in batch]
        return self.plan.sampler.sample(self.student, self.plan.student.tokenizer, prompts, batch)

    def align(self, rollout: Rollout) -> TeacherView:
        plan = self.plan
        t_prompts = [render_prompt(plan.teacher.tokenizer, ex.prompt, plan.teacher.node["chat_template"])
                     for ex in rollout.examples]
        return plan.aligner.align(rollout, t_prompts)

    def student_topk(self, rollout: Rollout) -> Scores | None:
        """The student's own top-k without gradients, when the support reads it."""
        if not self.plan.support.student_topk:
            return None
        with torch.no_grad():
            return self.score_student(rollout, None, topk=self.plan.support.student_topk)

    def _extra_ids(self, student_top: Scores | None) -> Tensor | None:
        """Ids whose teacher logits the teacher's pass also reads: the student's own top-k (one
        vocabulary on both sides), which supports may add to the teacher's top-k."""
        if student_top is None or not self.plan.aligner.shared_vocabulary:
            return None
        return student_top.topk_ids

    def _lean_full_vocabulary(self) -> bool:
        return self.plan.loss.full_vocabulary and self.stage["head"] == "lean"

    def select_support(self, rollout: Rollout, view: TeacherView, teacher: Scores,
                       student_top: Scores | None = None) -> tuple[Support, Scores]:
        """The support, and the teacher's Scores with its logits on the support, read from the
        teacher's pass (its top-k, the extra ids, the sampled token); a support holding other ids
        costs a second pass over those ids."""
        plan = self.plan
        if plan.loss.full_vocabulary:
            support = full_support(rollout.targets, plan.student.output_ids)
            if self._lean_full_vocabulary():  # the loss path runs the teacher's head per chunk
                return support, teacher
            t_ids = support.ids
        else:
            support = plan.support.select(teacher, student_top, rollout, view)
            t_ids = support.teacher_ids if support.teacher_ids is not None else support.ids
            logits = self._teacher_logits_from_pass(teacher, view, t_ids, support.valid, self._extra_ids(student_top))
            if logits is not None:
                return support, dataclasses.replace(teacher, support_logits=logits)
        with torch.no_grad():  # ids the first pass did not read: a second pass
            _, t_head = split_model(self.teacher) or (None, None)
            t_sup = head_scores(teacher.hidden, t_head, view.targets, temperature=self.temperature,
                                support_ids=t_ids, entropy=False,
                                vocab_rows=plan.teacher.output_ids, chunk_size=self.stage["chunk_size"])
        return support, dataclasses.replace(teacher, support_logits=t_sup.support_logits)

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

    def mask(self, rollout: Rollout, view: TeacherView) -> Tensor:
        mask = rollout.response_mask & view.positions(self.plan.loss.positions)
        for m in self.plan.maskers:
            mask &= m.mask(rollout, view)
        return mask

    def prepare(self, rollout: Rollout) -> tuple[TeacherView, Scores, Support, Tensor]:
        """Align, score the teacher, select the support and mask: everything the loss reads besides
        the student's own scores."""
        view = self.align(rollout)
        student_top = self.student_topk(rollout)
        teacher = self.score_teacher(view, self._extra_ids(student_top))
        support, teacher = self.select_support(rollout, view, teacher, student_top)
        return view, teacher, support, self.mask(rollout, view)

    def update(self, rollout: Rollout, view: TeacherView, teacher: Scores, support: Support, mask: Tensor,
               optimizer: Any = None, scheduler: Any = None) -> dict[str, list[Tensor]]:
        """Loss, backward and optimizer step(s) on one rollout batch: ``mini_batches`` optimizer
        steps (strided row sets; later ones are off-policy against π_old), each accumulating
        ``micro_batches`` backward passes, each normalised by the tokens of the whole mini-batch on
        every rank. Outside a fit, pass the optimizer (and optionally the scheduler)."""
        st = self.stage
        opt = optimizer if optimizer is not None else self.optimizers()
        sched = scheduler if scheduler is not None or optimizer is not None else self.lr_schedulers()
        world = self._world()
        B = rollout.input_ids.shape[0]
        old_logprob = None
        if st["mini_batches"] > 1:  # later mini-batches are off-policy: keep π_old from before the first update
            with torch.no_grad():
                old_logprob = self.score_student(rollout, None).token_logprob
        logs: dict[str, list[Tensor]] = {}
        for rows in mini_batch_rows(B, st["mini_batches"]):
            n_tokens = mask[rows.to(mask.device)].sum().float()
            if world > 1:
                n_tokens = dist.all_sum(n_tokens)
            n_tokens = n_tokens.clamp_min(1.0)
            for micro in micro_batch_rows(rows, st["micro_batches"]):
                old = take(old_logprob, micro) if old_logprob is not None else None
                inputs, out = self.loss_backward(take(rollout, micro), take(support, micro), take(teacher, micro),
                                                 old, take(mask, micro), take(view, micro), n_tokens * (1.0 / world))
                for k, v in self._diagnostics(inputs, out.token_loss, out.stats).items():
                    logs.setdefault(k, []).append(v)
            logs.setdefault("grad_norm", []).append(self._clip(st["max_grad_norm"]))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
        if sched is not None:
            logs["lr"] = [torch.tensor(sched.get_last_lr()[0])]
        return logs

    def loss_backward(self, ro: Rollout, sup: Support, teacher: Scores, old: Tensor | None, mask: Tensor,
                      view: TeacherView, denominator: Tensor) -> tuple[LossInputs, Any]:
        """Student scores (naive or lean head), the loss Σ mask·ℓ / ``denominator``, and one backward
        pass through head and body. Returns the loss inputs and output (for diagnostics)."""
        cols = torch.arange(ro.prompt_len - 1, ro.input_ids.shape[1] - 1, device=ro.input_ids.device)
        feats, head = response_hidden(self.student, ro.input_ids, ro.attention_mask, ro.position_ids,
                                      cols.expand(ro.input_ids.shape[0], -1))
        lean = self.stage["head"] == "lean"
        if lean and head is None:
            self._warn_no_split()
            lean = False
        kw = dict(temperature=self.temperature, vocab_rows=self.plan.student.output_ids,
                  buckets=self._bins("student"), n_buckets=N_BINS, entropy=True)
        self._phase("loss_path_start")
        loss_fn = self.plan.loss
        if lean and loss_fn.full_vocabulary:  # both models' logits one chunk at a time
            assert teacher.hidden is not None
            split = split_model(self.teacher)
            token_loss, student = full_vocab_loss(
                feats, head, teacher.hidden, split[1] if split else None, ro.targets, loss_fn.divergence,
                student_rows=self.plan.student.output_ids, teacher_rows=self.plan.teacher.output_ids,
                temperature=self.temperature, chunk_size=self.stage["head_chunk"])
            out = LossOutput(token_loss=token_loss)
        elif lean:
            student = lean_scores(feats, head, ro.targets, support_ids=sup.ids, chunk_size=self.stage["head_chunk"], **kw)
        else:
            student = head_scores(feats, head, ro.targets, support_ids=sup.ids, **kw)
        inputs = LossInputs(student=student, teacher=teacher, support=sup,
                            old_logprob=old if old is not None else student.token_logprob.detach(),
                            mask=mask, rollout=ro, view=view)
        if not (lean and loss_fn.full_vocabulary):
            out = checked_output(loss_fn, loss_fn.compute(inputs), mask)
        self._backward((out.token_loss * mask.to(out.token_loss.dtype)).sum() / denominator)
        self._phase("loss_path_end")
        return inputs, out

    def _clip(self, max_norm: float | None) -> Tensor:
        """Clip the student's gradient norm (over every rank's shard where parameters are sharded)
        and return the norm before clipping."""
        limit = max_norm or float("inf")
        wrapped = self.trainer.strategy.model if self._trainer is not None else None
        if wrapped is not None and hasattr(wrapped, "clip_grad_norm_"):  # FSDP: the norm over all shards
            return wrapped.clip_grad_norm_(limit).detach()
        return torch.nn.utils.clip_grad_norm_(self.student.parameters(), limit).detach()

    def log_step(self, logs: dict[str, list[Tensor]], rollout: Rollout, view: TeacherView) -> None:
        """Log the step's diagnostics (means over micro-batches; on several processes, the mean of
        the ranks' values, except ``tokens``, the sum over ranks)."""
        logs["response_len"] = [rollout.lengths.float().mean()]
        logs["truncated_frac"] = [rollout.truncated.float().mean()]
        logs["repetition_frac"] = [repetition_frac(rollout.targets, rollout.lengths,
                                                   self.plan.student.tokenizer.eos_token_id)]
        logs.update({k: [v] for k, v in alignment_stats(rollout, view).items()})
        world = self._world()
        for k, vs in logs.items():
            v = torch.stack([x.float().detach().to(self.device) for x in vs])
            v = v.sum() if k == "tokens" else v.mean()
            if k == "tokens" and world > 1:
                v = dist.all_sum(v)
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "grad_norm"), batch_size=rollout.input_ids.shape[0],
                     sync_dist=world > 1 and k != "tokens")

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

    @torch.no_grad()
    def _diagnostics(self, x: LossInputs, token_loss: Tensor, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        loss = masked_mean(token_loss.detach(), x.mask)
        m = x.mask if x.view is None else x.mask & x.view.positions("token")  # teacher values of the same token
        gap = x.teacher.token_logprob - x.student.token_logprob.detach()
        out = {
            "loss": loss,
            "logprob_gap": masked_mean(gap, m),
            "neg_reward_frac": masked_mean((gap < 0).float(), m),
            "student_entropy": masked_mean(x.student.entropy, m) if x.student.entropy is not None else None,
            "teacher_entropy": masked_mean(x.teacher.entropy, m) if x.teacher.entropy is not None else None,
            "tokens": m.sum().float(),
        }
        if x.teacher.topk_ids is not None and x.teacher.topk_logits is not None:
            mass = (x.teacher.topk_logits - x.teacher.lse.unsqueeze(-1)).exp().sum(-1)
            sampled = x.rollout.targets if x.view is None else x.view.targets  # as a teacher id
            inside = (x.teacher.topk_ids == sampled.unsqueeze(-1)).any(-1)
            out["teacher_topk_mass"] = masked_mean(mass, m)
            out["sampled_outside_topk"] = masked_mean((~inside).float(), m)
        out.update({k: v.detach() for k, v in stats.items()})
        return {k: v for k, v in out.items() if v is not None}
