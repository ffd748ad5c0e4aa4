"""Base classes of the seven plugin kinds (samplers, aligners, supports, maskers, losses, tasks and
environments). A plugin subclasses one, takes its options as keyword-only constructor arguments
(those are its config keys), and registers itself with the kind's registry. ``bind`` is called
once after construction with the run's Context (tokenizers, vocabulary sizes, task): everything
checkable without model weights is checked there."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from opdlm.errors import ConfigError
from opdlm.ops.pg import ClipEps, DualClip, ppo_token_loss
from opdlm.reads import Reads
from opdlm.types import Example, LossInputs, LossOutput, Rollout, Scores, Support, TeacherView


@dataclass
class Context:
    """What plugins may look at before any weights are loaded."""

    student_tokenizer: Any  # a transformers PreTrainedTokenizerBase
    teacher_tokenizer: Any
    student_vocab_rows: int  # output rows of the student's head (>= its tokenizer's ids)
    teacher_vocab_rows: int
    task: Task | None = None
    #: a cross-tokenizer aligner's PairTables (opdlm.xtok.tables), published by its bind() so that
    #: supports and maskers use the same role map
    vocab_map: Any = None


class Plugin:
    """Base of every plugin: ``plugin_name`` and ``plugin_kind`` are set when it is registered
    (``@LOSSES.register("name")``); its options are its keyword-only constructor arguments."""

    plugin_name: str = ""
    plugin_kind: str = ""
    #: options that hold plugin nodes: option -> (kind, extra keys of this plugin with their defaults);
    #: the config check completes those nodes with their own defaults, as it does top-level ones
    nested_nodes: dict[str, tuple[str, dict[str, Any]]] = {}

    def bind(self, ctx: Context) -> None:  # noqa: B027 - optional hook
        """Check options against the run (tokenizers, vocabularies); raise ConfigError."""


class Task(Plugin):
    """Prompts with reference answers, and a verifier. An ``interactive`` task is played turn by
    turn instead (sampler multi_turn): it starts an Episode per example (``start``), renders each
    observation as a user turn (``user_turn``), and an episode counts as correct when it is won."""

    interactive: bool = False

    def start(self, example: Example) -> Episode:
        """Interactive tasks: a new episode of the example's game."""
        raise NotImplementedError

    def user_turn(self, observation: str) -> str:
        """Interactive tasks: the text of the user turn that shows ``observation``."""
        raise NotImplementedError

    def examples(self, split: str) -> list[Example]:
        """The examples of split 'train', 'val' or 'test'."""
        raise NotImplementedError

    def verify(self, response: str, example: Example) -> bool:
        """Whether a decoded response answers the example correctly."""
        raise NotImplementedError

    def extract(self, response: str) -> str | None:
        """The answer a response gives, normalised so that equal answers compare equal (for maj@k
        votes), or None when it gives none the verifier can read (counted as ``unparsed``). A task
        that does not override this reports neither maj@k nor the unparsed share."""
        raise NotImplementedError

    def summary(self) -> str | None:
        """One line on the task's data that a run prints when it starts ("[opdlm] task LABEL: ..."),
        such as the sizes of its splits; None (the default) prints nothing."""
        return None

    def corpus(self) -> Iterable[str]:
        """Texts that cover the task's characters (used to build tiny tokenizers)."""
        for split in ("train", "val", "test"):
            for ex in self.examples(split):
                yield ex.prompt + (ex.solution or "") + ex.answer


@dataclass
class Step:
    """What an environment answers to an action."""

    observation: str  # the text the agent reads next
    reward: float
    done: bool  # the episode is over (won, lost, or the game ended it)
    won: bool
    valid: bool  # the action was one the game accepts here (else an ordinary, wasted move)


class Episode:
    """One play of one game: ``observation`` is the first text; ``step`` plays an action."""

    observation: str = ""
    done: bool = False
    won: bool = False

    def step(self, action: str) -> Step:
        """Play ``action`` (the text the agent wrote) and return what the game answers."""
        raise NotImplementedError

    def admissible(self) -> list[str]:
        """The actions the game accepts now."""
        raise NotImplementedError

    def walkthrough(self) -> list[str] | None:
        """An expert's winning actions from the start, when the game has them."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the game."""


class Environment(Plugin):
    """Interactive text games: disjoint train / val / test games, each started as an Episode."""

    def games(self, split: str) -> list[str]:
        """The game ids (for generated games, their files) of split 'train', 'val' or 'test'."""
        raise NotImplementedError

    def start(self, game: str) -> Episode:
        """A new episode of ``game`` (one of ``games(split)``), at its first observation."""
        raise NotImplementedError


class Sampler(Plugin):
    """On-policy rollouts from the student. A ``multi_turn`` sampler plays an interactive task's
    episodes; the engine passes it ``chat_template`` (how the model renders later user turns)."""

    n: int = 1
    temperature: float = 1.0
    max_new_tokens: int = 1
    multi_turn: bool = False
    #: the sampler cannot run in a run of several processes (refused at build)
    single_process: bool = False
    #: trainer.strategy words the sampler cannot run under (refused at build), each with the reason,
    #: e.g. a sharding it cannot take weights from: {"deepspeed": "..."}
    refused_strategies: Mapping[str, str] = MappingProxyType({})

    @property
    def response_budget(self) -> int:
        """The most tokens one rollout can have the loss count (a multi-turn sampler: all its actions)."""
        return self.max_new_tokens

    def start(self, model: nn.Module, tokenizer: Any) -> None:
        """Called on every process of a run at the same point, before a series of ``sample`` calls that
        each process makes on its own (an evaluation's batches): a sampler whose set-up is collective
        (an engine per process) sets up here. Nothing by default."""

    def sample(self, model: nn.Module, tokenizer: Any, prompt_ids: list[list[int]],
               examples: list[Example], *, greedy: bool = False, n: int | None = None) -> Rollout:
        """Generate ``n`` (default: the configured count) responses per prompt."""
        raise NotImplementedError


class Aligner(Plugin):
    """Maps the student's rollout onto the teacher's tokens."""

    #: whether align() uses the teacher's own rendering of the prompt (else the teacher reads the
    #: student's prompt tokens, so both must render prompts the same way)
    uses_teacher_prompt: bool = False
    #: whether teacher and student ids are one vocabulary (else supports must map ids, see
    #: SupportSelector.cross_vocabulary, and full-vocabulary losses cannot run)
    shared_vocabulary: bool = True

    def align(self, rollout: Rollout, teacher_prompt_ids: list[list[int]] | None = None,
              teacher_turns: list[list[list[int]]] | None = None) -> TeacherView:
        """The teacher's view of ``rollout``. An aligner that uses the teacher's prompt also gets, for
        multi-turn rollouts, ``teacher_turns``: per row, the teacher's own token ids of each user turn
        the conversation shows after the first (opdlm.conversation), in order."""
        raise NotImplementedError


def check_support_size(option: str, value: int, tokenizer: Any = None, side: str = "") -> None:
    """ConfigError for a support size below 1, or (with a tokenizer) above its number of ids."""

    if value < 1:
        raise ConfigError(f"{option}: must be >= 1, got {value}")
    if tokenizer is not None and value > len(tokenizer):
        raise ConfigError(f"{option}: {value} is larger than the {side}'s vocabulary ({len(tokenizer)} ids)")


class SupportSelector(Plugin):
    """Chooses the token set compared at each response position."""

    #: how many of the teacher's / student's own top ids select() needs in its Scores
    teacher_k: int = 0
    student_k: int = 0
    #: returns student ids with their teacher ids (Support.teacher_ids), so it works across tokenizers
    cross_vocabulary: bool = False

    @property
    def size(self) -> int:
        """Largest support size K this selector returns."""
        raise NotImplementedError

    def select(self, teacher: Scores, student: Scores | None, rollout: Rollout,
               view: TeacherView | None = None) -> Support:
        """The support [B, T, K] at each response position, from the teacher's scores (with its own
        top ``teacher_k`` ids), the student's (with its top ``student_k``; None when it needs none), the
        rollout and, across tokenizers, the teacher's view."""
        raise NotImplementedError


class Masker(Plugin):
    """Which response positions count in the loss; several maskers are combined with AND."""

    def mask(self, rollout: Rollout, view: TeacherView) -> Tensor:  # [B, T] bool
        """[B, T] bool: the response positions this masker keeps (True) in the loss."""
        raise NotImplementedError


class Loss(Plugin):
    """Per-token loss from gathered quantities (see opdlm.types.LossInputs)."""

    #: the Scores fields, positions and vocabulary the loss reads (opdlm.reads.Reads); the engine
    #: computes exactly those, and ``--check`` fails on a loss that reads a field it does not list
    reads: Reads = Reads()

    def check_support(self, support: SupportSelector, key: str) -> None:  # noqa: B027
        """Raise ConfigError if this loss cannot work with the support."""

    def parts(self) -> list[Loss]:
        """The losses this one is made of (weighted_sum's terms); the config check probes each."""
        return []

    def compute(self, inputs: LossInputs) -> LossOutput:
        """The per-token loss [B, T] (and scalar diagnostics) of one micro-batch; the engine takes
        its masked mean over the optimizer step."""
        raise NotImplementedError

    def divergence(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        """Losses with ``reads.vocabulary == "full"``: ℓ per position [n] from both models' log-probs
        over the whole vocabulary [n, V], differentiable in ``student_logprobs``. The lean head calls
        it on one block of positions at a time, so no [B, T, V] tensor is ever held."""
        raise NotImplementedError

    def divergence_grad(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> tuple[Tensor, Tensor]:
        """(ℓ [n], ∂ℓ/∂z [n, V]): ``divergence`` and its gradient with respect to the student's
        logits z (log π = log_softmax(z)), without gradients. The lean head calls this one; the
        default differentiates ``divergence`` with autograd, and a loss may give a closed form,
        which saves passes over the [n, V] block. Both arguments may be overwritten."""
        z = student_logprobs.detach().requires_grad_(True)
        with torch.enable_grad():  # log_softmax(log π) = log π, and its gradient is the one through z
            val = self.divergence(torch.log_softmax(z, -1), teacher_logprobs)
            (grad,) = torch.autograd.grad(val.sum(), z)
        return val.detach(), grad


class ClippedPG(Loss):
    """Base of the losses that update through the PPO clipped surrogate (sampled-token OPD and its
    relatives): options clip_eps (the ratio is clipped to [1 - ε, 1 + ε]) and dual_clip (c > 1 caps
    the loss of a negative advantage at -c·A; null: no cap)."""

    def __init__(self, *, clip_eps: ClipEps = 0.2, dual_clip: DualClip = 3.0) -> None:
        self.clip_eps, self.dual_clip = clip_eps, dual_clip

    def clipped(self, logprob: Tensor, old_logprob: Tensor,
                advantage: Tensor) -> tuple[Tensor, Tensor]:
        """ppo_token_loss with this loss's options."""
        return ppo_token_loss(logprob, old_logprob, advantage, self.clip_eps, self.dual_clip)
