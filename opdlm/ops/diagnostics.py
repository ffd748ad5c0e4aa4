"""Diagnostics of a step: of the rollouts (what the paper plots but gives no formula for) and of
the loss inputs (what the step log shows)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from opdlm import dist
from opdlm.ops.batch import alignment_stats
from opdlm.rollouts import end_ids
from opdlm.types import LossInputs, Rollout, TeacherView, masked_mean


def tail_repeats(tokens: list[int], max_n: int = 4, repeats: int = 3) -> bool:
    """True if the sequence ends with some n-gram (n <= max_n) written ``repeats`` times in a row,
    e.g. "Wait, Wait, Wait," - the repetition loop of a drifted student."""
    for n in range(1, max_n + 1):
        span = n * repeats
        if len(tokens) < span:
            break
        tail = tokens[-span:]
        if all(tail[i] == tail[i % n] for i in range(span)):
            return True
    return False


def repetition_frac(targets: Tensor, lengths: Tensor, eos_id: int | list[int] | None, max_n: int = 4,
                    repeats: int = 3) -> Tensor:
    """Share of responses (EOS excluded) whose tail repeats an n-gram ``repeats`` times."""
    hits = 0
    for row, n in zip(targets.tolist(), lengths.tolist()):
        toks = row[:n]
        if toks and eos_id is not None and toks[-1] in ([eos_id] if isinstance(eos_id, int) else eos_id):
            toks = toks[:-1]
        hits += tail_repeats(toks, max_n, repeats)
    return torch.tensor(hits / max(1, len(lengths)))


def bucket_names(edges: list[int] | tuple[int, ...]) -> list[str]:
    """'0-15', '16-63', ..., '1024+' for lower edges [0, 16, ..., 1024] of response positions."""
    return [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"] if edges else []


def gap_by_position(gap: Tensor, mask: Tensor, edges: list[int] | tuple[int, ...]) -> dict[str, Tensor]:
    """The teacher − student log-prob gap of sampled tokens per bucket of response positions: its
    mean and its 10th percentile (the lower tail the LSM paper's Figure 4 shows widening at later
    positions). Buckets without a counted token are left out."""
    out: dict[str, Tensor] = {}
    pos = torch.arange(gap.shape[1], device=gap.device).expand_as(gap)
    bounds = [*edges, None]
    for name, lo, hi in zip(bucket_names(edges), bounds[:-1], bounds[1:]):
        m = mask & (pos >= lo) & ((pos < hi) if hi is not None else torch.ones_like(mask))
        if bool(m.any()):
            vals = gap[m].float()
            out[f"gap_pos/{name}/mean"] = vals.mean()
            out[f"gap_pos/{name}/p10"] = torch.quantile(vals, 0.1)
    return out


@torch.no_grad()
def loss_diagnostics(x: LossInputs, token_loss: Tensor, stats: dict[str, Tensor],
                     gap_buckets: list[int] | tuple[int, ...] = ()) -> dict[str, Tensor]:
    """What the step log shows of one micro-batch: the loss, the teacher-student log-prob gap of the
    sampled tokens (overall and per bucket of positions) and the share of them the teacher likes
    less, both entropies, the token count, the teacher's top-k mass and how often the sampled token
    falls outside it, how far the sampler's probability of each sampled token is from the one being
    trained (rollout_vs_trainer: the behaviour policy includes top-p), and the loss's stats. A
    micro-batch without a counted token logs only its loss (0), token count and the loss's stats."""
    loss = masked_mean(token_loss.detach(), x.mask)
    m = x.mask if x.view is None else x.mask & x.view.positions("token")  # teacher values of the same token
    gap = x.teacher.token_logprob - x.student.token_logprob.detach()
    if not bool(m.any()):  # no counted token: a mean over none would read as a value of 0
        return {"loss": loss, "tokens": m.sum().float(), **{k: v.detach() for k, v in stats.items()}}
    out = {
        "loss": loss,
        "logprob_gap": masked_mean(gap, m),
        "neg_reward_frac": masked_mean((gap < 0).float(), m),
        "student_entropy": masked_mean(x.student.entropy, m) if x.student.entropy is not None else None,
        "teacher_entropy": masked_mean(x.teacher.entropy, m) if x.teacher.entropy is not None else None,
        "tokens": m.sum().float(),
    }
    out.update(gap_by_position(gap, m, gap_buckets))
    diff = (x.rollout.behaviour_logprobs.to(gap.dtype).exp() - x.student.token_logprob.detach().exp()).abs()
    rm = x.mask
    if bool(rm.any()):
        out["rollout_vs_trainer/prob_diff_mean"] = masked_mean(diff, rm)
        out["rollout_vs_trainer/prob_diff_max"] = diff[rm].max()
    if x.teacher.topk_ids is not None and x.teacher.topk_logits is not None:
        mass = (x.teacher.topk_logits - x.teacher.lse.unsqueeze(-1)).exp().sum(-1)
        sampled = x.rollout.targets if x.view is None else x.view.targets  # as a teacher id
        inside = (x.teacher.topk_ids == sampled.unsqueeze(-1)).any(-1)
        out["teacher_topk_mass"] = masked_mean(mass, m)
        out["sampled_outside_topk"] = masked_mean((~inside).float(), m)
    out.update({k: v.detach() for k, v in stats.items()})
    return {k: v for k, v in out.items() if v is not None}


def rollout_diagnostics(rollout: Rollout, view: TeacherView, tokenizer: Any) -> dict[str, Tensor]:
    """What the step log shows of the rollouts: mean response length, the share truncated by the
    length budget, the share ending in a repetition loop, and (across tokenizers) the alignment."""
    if rollout.outcomes is not None:  # multi-turn: how the episodes went (lengths count action tokens)
        oc = rollout.outcomes
        turns = torch.tensor([float(o.turns) for o in oc])
        return {
            "response_len": rollout.lengths.float().mean(),
            "truncated_frac": rollout.truncated.float().mean(),
            "episode/won_frac": torch.tensor([float(o.won) for o in oc]).mean(),
            "episode/turns": turns.mean(),
            "episode/invalid_frac": torch.tensor([float(o.invalid) for o in oc]).sum() / turns.sum().clamp_min(1.0),
            **alignment_stats(rollout, view),
        }
    return {
        "response_len": rollout.lengths.float().mean(),
        "truncated_frac": rollout.truncated.float().mean(),
        "repetition_frac": repetition_frac(rollout.targets, rollout.lengths, end_ids(tokenizer)),
        **alignment_stats(rollout, view),
    }


def reduce_step_log(logs: dict[str, list[Tensor]], rollout: Rollout, view: TeacherView, tokenizer: Any,
                    device: torch.device, world: int) -> dict[str, Tensor]:
    """The step's diagnostics with the rollouts' (rollout_diagnostics) added, each reduced to one
    value: the mean over micro-batches, and on several processes the mean of the values of the ranks
    that have one, except ``tokens``, the sum. A rank can lack a mean (no counted token in its
    rollouts), so the ranks first agree on the keys and reduce them all in one collective: per-key
    reductions of different key sets would pair wrong values or wait forever."""
    logs = {**logs, **{k: [v] for k, v in rollout_diagnostics(rollout, view, tokenizer).items()}}
    values = {}
    for k, vs in logs.items():
        v = torch.stack([x.float().detach().to(device) for x in vs])
        values[k] = v.sum() if k == "tokens" else v.mean()
    if world > 1:
        keys = dist.all_keys(list(values))
        zero = torch.zeros((), device=device)
        pairs = torch.stack([torch.stack([values.get(k, zero), zero + (k in values)]) for k in keys])
        pairs = dist.all_sum(pairs)
        values = {k: s if k == "tokens" else s / n for k, (s, n) in zip(keys, pairs) if n > 0}
    return values
