"""What a loss reads, declared once: ``Loss.reads``.

A loss names the Scores fields it reads on each side, the kind of positions it reads and whether
it compares the configured support or the whole vocabulary. The engine computes exactly those
(besides the sampled-token log-probs, log-sum-exp and entropy, which the step log always shows),
``build`` checks at config time that the chosen support and aligner can provide them, and
``weighted_sum`` declares the union of its terms. ``probe`` runs the loss once on a small batch of
random scores in which every undeclared field is hidden, so a loss that reads a field it did not
declare fails at ``--check`` with its name, not during training.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from opdlm.errors import ConfigError, PluginError
from opdlm.ops.head import head_scores
from opdlm.types import LossInputs, LossOutput, Rollout, Scores, Support, TeacherView
from opdlm.xtok.tables import N_BINS

#: Scores fields a loss may read, per side
STUDENT_FIELDS = ("token_logprob", "lse", "support_logits", "entropy", "byte_logprobs")
TEACHER_FIELDS = STUDENT_FIELDS + ("topk_ids", "topk_logits", "chunk_logprob")
#: position kinds (TeacherView.positions), narrowest first
POSITIONS = ("token", "start", "chunk")
VOCABULARIES = ("support", "full")


@dataclass(frozen=True)
class Reads:
    """Scores fields read on each side, the positions read and the vocabulary compared.

    positions: 'token' (the teacher's distribution for the same token: every position with one
    tokenizer, same-token chunks across tokenizers), 'start' (chunk starts) or 'chunk' (every
    aligned token). vocabulary: 'support' (the configured support: Support.ids and the
    support_logits on it) or 'full' (every id: the engine passes a support of the whole vocabulary
    on the naive head path and calls ``Loss.divergence`` chunk by chunk on the lean one)."""

    student: frozenset[str] = frozenset({"token_logprob"})
    teacher: frozenset[str] = frozenset({"token_logprob"})
    positions: str = "token"
    vocabulary: str = "support"

    def __post_init__(self) -> None:
        for side, allowed in (("student", STUDENT_FIELDS), ("teacher", TEACHER_FIELDS)):
            bad = sorted(set(getattr(self, side)) - set(allowed))
            if bad:
                raise ValueError(f"Reads.{side}: {', '.join(bad)} cannot be read on the {side} side; "
                                 f"choices: {', '.join(allowed)}")
            object.__setattr__(self, side, frozenset(getattr(self, side)))
        if self.positions not in POSITIONS:
            raise ValueError(f"Reads.positions: {self.positions!r}; choices: {', '.join(POSITIONS)}")
        if self.vocabulary not in VOCABULARIES:
            raise ValueError(f"Reads.vocabulary: {self.vocabulary!r}; choices: {', '.join(VOCABULARIES)}")

    @classmethod
    def of(cls, *both: str, student: Iterable[str] = (), teacher: Iterable[str] = (),
           positions: str = "token", vocabulary: str = "support") -> Reads:
        """``Reads.of("support_logits", "lse", teacher=("entropy",))``: fields in ``both`` are read on
        both sides."""
        return cls(student=frozenset(both) | frozenset(student), teacher=frozenset(both) | frozenset(teacher),
                   positions=positions, vocabulary=vocabulary)

    def union(self, other: Reads) -> Reads:
        """What two losses read together: both sides' fields, the widest positions. A support loss
        and a full-vocabulary one cannot be summed (they need different supports)."""
        if self.vocabulary != other.vocabulary:
            raise ConfigError("full-vocabulary losses (reverse_kl, forward_kl, jsd with full: true) cannot be "
                              "mixed with support losses")
        return Reads(student=self.student | other.student, teacher=self.teacher | other.teacher,
                     positions=max(self.positions, other.positions, key=POSITIONS.index),
                     vocabulary=self.vocabulary)

    def has(self, side: str, field: str) -> bool:
        """Whether ``field`` is read on ``side`` (student or teacher)."""
        return field in getattr(self, side)


def check_reads(loss: Any, support: Any, aligner: Any) -> None:
    """ConfigError when the chosen support or aligner cannot provide what the loss reads."""
    r: Reads = loss.reads
    name = loss.plugin_name
    if r.vocabulary == "full" and not aligner.shared_vocabulary:
        raise ConfigError(f"'{name}' compares the full vocabulary id by id, but aligner '{aligner.plugin_name}' "
                          "joins two vocabularies; use a support loss with mapped_topk", key="loss")
    if r.vocabulary == "support" and ({"topk_ids", "topk_logits"} & r.teacher) and not support.teacher_k:
        raise ConfigError(f"loss '{name}' reads the teacher's own top-k, which support '{support.plugin_name}' "
                          "does not compute; choose a support built on the teacher's top-k (teacher_topk, ...)",
                          key="support.name")


class UndeclaredRead(RuntimeError):
    """A loss read a Scores field that its ``reads`` does not declare."""


class _Declared(Scores):
    """Scores whose undeclared fields raise UndeclaredRead (the probe's inputs)."""

    def __getattribute__(self, name: str) -> Any:
        if name in _ALL_FIELDS and name not in object.__getattribute__(self, "_declared"):
            raise UndeclaredRead(f"{object.__getattribute__(self, '_side')}.{name}")
        return object.__getattribute__(self, name)


_ALL_FIELDS = frozenset(f.name for f in fields(Scores))


def _declared(scores: Scores, side: str, declared: frozenset[str]) -> Scores:
    out = _Declared(**{f.name: getattr(scores, f.name) for f in fields(Scores)})
    object.__setattr__(out, "_declared", declared)
    object.__setattr__(out, "_side", side)
    return out


def checked_output(loss: Any, out: Any, mask: Tensor) -> LossOutput:
    """The loss plugin's output, or a PluginError naming the plugin and its file."""
    token_loss = getattr(out, "token_loss", None)
    if isinstance(out, LossOutput) and isinstance(token_loss, Tensor) and token_loss.shape == mask.shape:
        return out
    got = (f"a token_loss of shape {tuple(token_loss.shape)}" if isinstance(token_loss, Tensor)
           else type(out).__name__ if not isinstance(out, LossOutput) else f"token_loss {type(token_loss).__name__}")
    raise PluginError(f"loss '{loss.plugin_name}' ({_where(loss)}): compute() returned {got}; it must return "
                      f"LossOutput(token_loss=<tensor of shape {tuple(mask.shape)}>)")


def _where(loss: Any) -> str:
    return inspect.getsourcefile(type(loss)) or type(loss).__module__


def probe_batch(support_size: int, *, full: bool, seed: int = 0) -> dict[str, Any]:
    """Random student and teacher Scores (every field filled), a support, a rollout and an
    identity view for B = 2 rows of T = 3 positions (the probe's input; also used by tests)."""

    g = torch.Generator().manual_seed(seed)
    B, T = 2, 3
    V = max(support_size + 2, 6)
    K = V if full else support_size
    targets = torch.randint(0, V, (B, T), generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).reshape(B, T, K)
    valid = torch.ones(B, T, K, dtype=torch.bool)
    buckets = torch.randint(0, N_BINS, (V,), generator=g)
    s_logits = torch.randn(B, T, V, generator=g).requires_grad_()
    t_logits = torch.randn(B, T, V, generator=g)
    student = head_scores(s_logits, None, targets, support_ids=ids, entropy=True, buckets=buckets, n_buckets=N_BINS)
    with torch.no_grad():
        teacher = head_scores(t_logits, None, targets, support_ids=ids, topk=min(K, 4), entropy=True,
                              buckets=buckets, n_buckets=N_BINS)
    teacher = Scores(**{**{f.name: getattr(teacher, f.name) for f in fields(Scores)},
                        "chunk_logprob": teacher.token_logprob})
    input_ids = torch.cat([torch.zeros(B, 1, dtype=torch.long), targets], 1)
    rollout = Rollout(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                      position_ids=torch.arange(T + 1).expand(B, -1), prompt_len=1,
                      response_mask=torch.ones(B, T, dtype=torch.bool),
                      behaviour_logprobs=student.token_logprob.detach(), truncated=torch.zeros(B, dtype=torch.bool),
                      examples=[], texts=["" for _ in range(B)])
    view = TeacherView(input_ids=input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids,
                       pred_columns=torch.arange(T).expand(B, -1), targets=targets,
                       aligned=torch.ones(B, T, dtype=torch.bool))
    return {"student": student, "teacher": teacher, "support": Support(ids=ids, valid=valid), "rollout": rollout,
            "view": view, "student_logits": s_logits, "teacher_logits": t_logits}


def probe(loss: Any, support_size: int, key: str = "loss") -> None:
    """Run the loss once on random scores where only its declared fields can be read: a ConfigError
    names an undeclared read, a PluginError any other failure or a malformed output."""
    r: Reads = loss.reads
    full = r.vocabulary == "full"
    x = probe_batch(support_size, full=full)
    inputs = LossInputs(student=_declared(x["student"], "student", r.student),
                        teacher=_declared(x["teacher"], "teacher", r.teacher), support=x["support"],
                        old_logprob=x["student"].token_logprob.detach(), mask=x["rollout"].response_mask,
                        rollout=x["rollout"], view=x["view"])
    try:
        checked_output(loss, loss.compute(inputs), inputs.mask)
        if full:
            n = inputs.mask.numel()
            ls = torch.log_softmax(x["student_logits"], -1).reshape(n, -1)
            lt = torch.log_softmax(x["teacher_logits"], -1).reshape(n, -1)
            d = loss.divergence(ls, lt)
            if not isinstance(d, Tensor) or d.shape != (n,):
                raise PluginError(f"loss '{loss.plugin_name}' ({_where(loss)}): divergence() must return one value "
                                  f"per position (shape ({n},)), got {getattr(d, 'shape', type(d).__name__)}")
    except UndeclaredRead as e:
        raise ConfigError(f"'{loss.plugin_name}' reads {e} but its `reads` declaration does not list it "
                          f"({_where(loss)}; see opdlm.reads.Reads)", key=key) from None
    except (PluginError, ConfigError):
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a plugin's code is reported with its name
        raise PluginError(f"loss '{loss.plugin_name}' ({_where(loss)}) failed on a probe batch of random scores "
                          f"(support of {inputs.support.size} ids): {type(e).__name__}: {e}") from e
