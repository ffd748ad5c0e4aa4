"""The on-policy distillation LightningModule (the SFT one is in opdlm/sft.py; both evaluate the
same way). The OPD ``training_step`` reads like the algorithm: sample, align, score the teacher,
select the support, mask, compute the loss, step, log. It never branches on a plugin's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from opdlm.build import Plan
from opdlm.models import render_prompt
from opdlm.ops.batch import _chunks, _chunks_of, alignment_stats, full_support, per_chunk_sum, take
from opdlm.ops.diagnostics import repetition_frac
from opdlm.ops.head import gather_columns, head_scores, model_hidden, response_hidden
from opdlm.ops.lean import lean_backward
from opdlm.sft import GenerationEval, SFTModule, eval_modes, load_or_build, make_optimizer
from opdlm.types import Example, LossInputs, Rollout, Scores, Support, TeacherView, masked_mean
from opdlm.xtok.tables import N_BINS

__all__ = ["OPDModule", "SFTModule", "alignment_stats", "full_support", "load_or_build"]


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
        self.teacher = teacher if teacher is not None else load_or_build(plan.teacher, teacher_init, seed + 1)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.stage = config["stages"]["opd"]
        self.temperature = plan.sampler.temperature
        self.automatic_optimization = False
        self._bin_cache: dict[str, Tensor] = {}
        self.strict_loading = False  # checkpoints leave the frozen teacher out
        self.setup_eval(plan, eval_modes(config), plan.student.node["chat_template"])

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        return self.student

    @property
    def eval_tokenizer(self) -> Any:
        return self.plan.student.tokenizer

    def train(self, mode: bool = True) -> OPDModule:
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval mode
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith("teacher.")]:
            del sd[k]

    def configure_optimizers(self) -> Any:
        return make_optimizer(self, self.student.parameters(), self.stage)

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
    def score_teacher(self, view: TeacherView) -> tuple[Tensor, Any, Scores]:
        hidden, head = model_hidden(self.teacher, view.input_ids, view.attention_mask, view.position_ids)
        feats = gather_columns(hidden, view.pred_columns)
        spec, chunk = self.plan.teacher, self.stage["chunk_size"]
        bins = self._bins("teacher")
        scores = head_scores(feats, head, view.targets, temperature=self.temperature,
                             topk=self.plan.support.teacher_topk, entropy=True, vocab_rows=spec.output_ids,
                             chunk_size=chunk, buckets=bins, n_buckets=N_BINS)
        if self.plan.loss.needs_chunk_logprob:
            if view.teacher_columns is None:
                chunk_lp = scores.token_logprob
            else:  # Σ of the teacher's token log-probs per chunk, read at each student token
                assert view.teacher_targets is not None and view.teacher_chunk is not None
                tok = head_scores(gather_columns(hidden, view.teacher_columns), head, view.teacher_targets,
                                  temperature=self.temperature, entropy=False, vocab_rows=spec.output_ids,
                                  chunk_size=chunk).token_logprob
                tc = view.teacher_chunk
                sums = per_chunk_sum(tok, tc, max(tc.shape[1], view.targets.shape[1]) + 1)
                chunk_lp = sums.gather(1, view.chunk_ids().clamp_min(0))
            scores = dataclasses.replace(scores, chunk_logprob=chunk_lp)
        return feats, head, scores

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

    def training_step(self, batch: list[Example], batch_idx: int) -> None:
        plan = self.plan
        prompts = [render_prompt(plan.student.tokenizer, ex.prompt, self.chat_template) for ex in batch]
        rollout = plan.sampler.sample(self.student, plan.student.tokenizer, prompts, batch)   # 1. sample
        view, teacher, support, mask = self.prepare(rollout)                                  # 2.-5.
        self._update(rollout, view, teacher, support, mask)                                  # 6. loss + step

    def prepare(self, rollout: Rollout) -> tuple[TeacherView, Scores, Support, Tensor]:
        """Align, score the teacher, select the support and mask: everything the loss reads besides
        the student's own scores."""
        plan, st = self.plan, self.stage
        t_prompts = [render_prompt(plan.teacher.tokenizer, ex.prompt, plan.teacher.node["chat_template"])
                     for ex in rollout.examples]
        view = plan.aligner.align(rollout, t_prompts)                                    # 2. align
        t_feats, t_head, teacher = self.score_teacher(view)                               # 3. teacher
        student_top = None
        if plan.support.student_topk:
            with torch.no_grad():
                student_top = self.score_student(rollout, None, topk=plan.support.student_topk)
        support = plan.support.select(teacher, student_top, rollout, view)                # 4. support
        if plan.loss.full_vocabulary:
            support = full_support(rollout.targets, plan.student.output_ids)
        with torch.no_grad():
            t_ids = support.teacher_ids if support.teacher_ids is not None else support.ids
            t_sup = head_scores(t_feats, t_head, view.targets, temperature=self.temperature,
                                support_ids=t_ids, entropy=False,
                                vocab_rows=plan.teacher.output_ids, chunk_size=st["chunk_size"])
        teacher = dataclasses.replace(teacher, support_logits=t_sup.support_logits)
        mask = rollout.response_mask & view.positions(plan.loss.positions)                # 5. mask
        for m in plan.maskers:
            mask &= m.mask(rollout, view)
        return view, teacher, support, mask

    def _update(self, rollout: Rollout, view: TeacherView, teacher: Scores, support: Support, mask: Tensor) -> None:
        st = self.stage
        opt = self.optimizers()
        sched = self.lr_schedulers()
        B = rollout.input_ids.shape[0]
        mini = max(1, min(st["mini_batches"], B))
        old_logprob = None
        if mini > 1:  # later mini-batches are off-policy: keep π_old from before the first update
            with torch.no_grad():
                old_logprob = self.score_student(rollout, None).token_logprob
        logs: dict[str, list[Tensor]] = {}
        for mb in _chunks(B, mini):
            n_tokens = mask[mb].sum().float()
            if self.trainer.world_size > 1:
                n_tokens = self.all_gather(n_tokens).sum()
            n_tokens = n_tokens.clamp_min(1.0)
            for micro in _chunks_of(mb, st["micro_batches"]):
                ro = take(rollout, micro)
                sup = take(support, micro)
                old = old_logprob[micro] if old_logprob is not None else None
                inputs, out = self._loss_backward(ro, sup, take(teacher, micro), old, mask[micro],
                                                  take(view, micro), n_tokens)
                for k, v in self._diagnostics(inputs, out.token_loss, out.stats).items():
                    logs.setdefault(k, []).append(v)
            gn = torch.nn.utils.clip_grad_norm_(self.student.parameters(), st["max_grad_norm"] or float("inf"))
            logs.setdefault("grad_norm", []).append(gn.detach())
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        logs["response_len"] = [rollout.lengths.float().mean()]
        logs["truncated_frac"] = [rollout.truncated.float().mean()]
        logs["repetition_frac"] = [repetition_frac(rollout.targets, rollout.lengths,
                                                   self.plan.student.tokenizer.eos_token_id)]
        logs["lr"] = [torch.tensor(sched.get_last_lr()[0])]
        logs.update({k: [v] for k, v in alignment_stats(rollout, view).items()})
        for k, vs in logs.items():
            self.log(f"train/{k}", torch.stack([v.float().detach().cpu() for v in vs]).mean(),
                     prog_bar=k in ("loss", "grad_norm"), batch_size=B)

    def _loss_backward(self, ro: Rollout, sup: Support, teacher: Scores, old: Tensor | None, mask: Tensor,
                       view: TeacherView, n_tokens: Tensor) -> tuple[LossInputs, Any]:
        """Student scores, loss and backward for one micro-batch, on the naive or the lean head path.
        Returns the loss inputs and output (for diagnostics; detached on the lean path)."""
        loss_fn = self.plan.loss
        world = self.trainer.world_size if self._trainer is not None else 1

        def inputs_for(student: Scores) -> LossInputs:
            o = old if old is not None else student.token_logprob.detach()
            return LossInputs(student=student, teacher=teacher, support=sup, old_logprob=o, mask=mask,
                              rollout=ro, view=view)

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
        if lean:
            def objective(student: Scores, span: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
                o = loss_fn.compute(inputs_for(student))
                tl = o.token_loss * mask.to(o.token_loss.dtype)
                if span is not None:
                    tl = tl.reshape(-1)[span[0] : span[1]]
                return tl.sum() / n_tokens * world, o.token_loss

            student, grad_feats = lean_backward(feats, head, ro.targets, sup.ids, objective,
                                                chunk_size=self.stage["head_chunk"],
                                                positionwise=loss_fn.positionwise, **kw)
            inputs = inputs_for(student)
            with torch.no_grad():
                out = loss_fn.compute(inputs)
        else:  # naive: autograd over the full [B, T, V] logits
            # one device: stop at the hidden states first, so the loss path is measurable on its
            # own; data-parallel: one backward call, as DDP's gradient hooks expect
            split = world == 1
            leaf = feats.detach().requires_grad_(True) if split else feats
            inputs = inputs_for(head_scores(leaf, head, ro.targets, support_ids=sup.ids, **kw))
            out = loss_fn.compute(inputs)
            self._backward((out.token_loss * mask.to(out.token_loss.dtype)).sum() / n_tokens * world)
            if not split:
                self._phase("loss_path_end")
                return inputs, out
            grad_feats = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        self._phase("loss_path_end")
        self._backward(feats, grad_feats)  # through the body
        return inputs, out

    def _phase(self, name: str) -> None:
        """A hook for benchmarks (memory and time per phase); does nothing by default."""
        hook = getattr(self, "phase_hook", None)
        if hook is not None:
            hook(name)

    def _backward(self, t: Tensor, grad: Tensor | None = None) -> None:
        """Lightning's manual_backward inside a fit; plain autograd when called directly (tests)."""
        if self._trainer is not None:
            self.manual_backward(t, grad) if grad is not None else self.manual_backward(t)
        else:
            t.backward(grad)

    def _warn_no_split(self) -> None:
        if not getattr(self, "_warned_split", False):
            import warnings
            warnings.warn("stages.opd.head=lean: the student's output head cannot be separated from its body "
                          f"({type(self.student).__name__}: logit scaling or soft-capping, or an unknown layout); "
                          "using the naive head path", stacklevel=2)
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
