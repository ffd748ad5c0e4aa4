"""Multi-turn rollouts: the student plays episodes of an interactive task (text_game).

Each turn the student writes an action with a single-turn sampler (``turn``: ``top_p`` by default, or
``vllm``; its top-p rule and behaviour log-probs; generation stops at the end of turn, the
tokenizer's EOS), the environment
answers, and the answer is appended as the next user turn (opdlm.conversation). An episode ends
when the game ends it (won or lost), after ``max_turns`` actions, when the next turn could not fit
in ``max_context`` tokens (the conversation so far plus a whole action of ``max_new_tokens``), or
when an action runs past ``max_new_tokens`` without ending its turn; the last three are truncated
(Outcome.end says which). Actions the game does not accept are ordinary moves, counted.

The whole conversation is one rollout row: the prompt is the first user turn, and the response
region holds the actions and the later user turns in order; ``response_mask`` covers the action
tokens (with their end of turn) only, so no loss ever trains on an observation or a template token,
while the teacher reads the same multi-turn context. Options: temperature, top_p, max_new_tokens (per
action) and n, as top_p's; max_turns (>= 1); max_context (tokens, >= one turn); turn (the sampler node
that writes each action, ``{name: top_p}`` or ``{name: vllm, ...}`` with that engine's own options;
the sampling options above are this plugin's).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from opdlm.conversation import Conversation
from opdlm.errors import ConfigError
from opdlm.plugin_api import Context, Sampler
from opdlm.registry import SAMPLERS
from opdlm.rollouts import Count, Nucleus, Temperature
from opdlm.types import Example, Outcome, Rollout


@SAMPLERS.register("multi_turn")
class MultiTurn(Sampler):
    """Plays episodes of an interactive task turn by turn with top-p actions; one rollout per episode."""

    multi_turn = True

    def __init__(self, *, temperature: Temperature = 1.0, top_p: Nucleus = 0.9, max_new_tokens: Count = 16, n: Count = 4,
                 max_turns: int = 8, max_context: int = 1024, turn: Mapping[str, Any] = MappingProxyType({"name": "top_p"})
                 ) -> None:
        # each action is one sample of the turn sampler (its option checks, its rule, its behaviour log-probs)
        if not isinstance(turn, Mapping) or turn.get("name") in (None, "multi_turn"):
            raise ConfigError(f"turn: a single-turn sampler node ({{name: top_p}} or {{name: vllm, ...}}), got {turn!r}")
        shared = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "n": n}
        clash = sorted(k for k in shared if k in turn)
        if clash:
            raise ConfigError(f"turn.{clash[0]}: set {clash[0]} on multi_turn itself (it applies to every action)")
        self.turn = SAMPLERS.build({**turn, **shared}, "turn")
        self.single_process = self.turn.single_process
        # each process plays its own number of turns, and a sharded model's every forward is collective
        sharded = ("a sharded student's forward is collective, but each process plays its episodes for its own "
                   "number of turns (a documented limit)")
        self.refused_strategies = {**self.turn.refused_strategies,
                                   **{w: sharded for w in ("fsdp", "model_parallel", "deepspeed")
                                      if w not in self.turn.refused_strategies}}
        self.temperature, self.top_p, self.max_new_tokens, self.n = temperature, top_p, max_new_tokens, n
        if max_turns < 1:
            raise ConfigError(f"max_turns: must be >= 1 (one turn), got {max_turns}")
        if max_context <= max_new_tokens:
            raise ConfigError(f"max_context: must leave room for one turn (more than max_new_tokens = "
                              f"{max_new_tokens} plus the prompt), got {max_context}")
        self.max_turns, self.max_context = max_turns, max_context
        self.task: Any = None

    @property
    def response_budget(self) -> int:
        return self.max_turns * self.max_new_tokens

    def start(self, model: nn.Module, tokenizer: Any) -> None:
        self.turn.start(model, tokenizer)

    def bind(self, ctx: Context) -> None:
        self.turn.bind(ctx)
        task = ctx.task
        if not getattr(task, "interactive", False):
            raise ConfigError(f"sampler: 'multi_turn' plays episodes of an interactive task (text_game), but task "
                              f"'{getattr(task, 'plugin_name', task)}' has single-turn prompts; use top_p")
        self.task = task

    @torch.no_grad()
    def sample(self, model: nn.Module, tokenizer: Any, prompt_ids: list[list[int]],
               examples: list[Example], *, greedy: bool = False, n: int | None = None,
               chat_template: bool = False) -> Rollout:
        n = self.n if n is None else n
        conv = Conversation(tokenizer, chat_template)
        B = len(examples) * n
        rows = [examples[i // n] for i in range(B)]
        seqs = [list(prompt_ids[i // n]) for i in range(B)]
        plen = [len(s) for s in seqs]
        mine: list[list[bool]] = [[] for _ in range(B)]
        behaviour: list[list[float]] = [[] for _ in range(B)]
        transcripts: list[list[tuple[str, str]]] = [[] for _ in range(B)]
        invalid, turns, end, replies = [0] * B, [0] * B, ["turns"] * B, [0] * B
        episodes: list[Any] = []
        try:
            for ex in rows:
                episodes.append(self.task.start(ex))
            active = []
            for i in range(B):
                if len(seqs[i]) + self.max_new_tokens > self.max_context:
                    end[i] = "context"
                else:
                    active.append(i)
            for turn in range(self.max_turns):
                if not active:
                    break
                ro = self.turn.sample(model, tokenizer, [seqs[i] for i in active], [rows[i] for i in active],
                                      greedy=greedy, n=1)
                still = []
                for j, i in enumerate(active):
                    k = int(ro.response_mask[j].sum())
                    seqs[i] += ro.targets[j, :k].tolist()
                    mine[i] += [True] * k
                    behaviour[i] += ro.behaviour_logprobs[j, :k].tolist()
                    text = ro.texts[j]
                    if bool(ro.truncated[j]):  # no end of turn: not an action the game can take
                        end[i] = "action"
                        transcripts[i].append((text, ""))
                        continue
                    step = episodes[i].step(text)
                    turns[i] += 1
                    invalid[i] += not step.valid
                    transcripts[i].append((text, step.observation))
                    if step.done:
                        end[i] = "won" if step.won else "lost"
                        continue
                    if turn == self.max_turns - 1:  # the turn budget is spent: no user turn the student would not answer
                        continue
                    reply = conv.user(self.task.user_turn(step.observation))
                    if len(seqs[i]) + len(reply) + self.max_new_tokens > self.max_context:
                        end[i] = "context"
                        continue
                    seqs[i] += reply
                    replies[i] += 1
                    mine[i] += [False] * len(reply)
                    behaviour[i] += [0.0] * len(reply)
                    still.append(i)
                active = still
        finally:
            for ep in episodes:
                ep.close()
        outcomes = [Outcome(won=end[i] == "won", turns=turns[i], invalid=invalid[i], end=end[i],
                            transcript=transcripts[i], replies=replies[i]) for i in range(B)]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return pack(seqs, plen, mine, behaviour, rows, outcomes, pad_id,
                    device=next(model.parameters()).device)


def transcript_text(outcome: Outcome) -> str:
    """A readable transcript: each action after '> ', then the game's answer."""
    return "\n".join(f"> {a}\n{o}" for a, o in outcome.transcript)


def pack(seqs: list[list[int]], plen: list[int], mine: list[list[bool]], behaviour: list[list[float]],
         rows: list[Example], outcomes: list[Outcome], pad_id: int, device: Any = "cpu") -> Rollout:
    """The Rollout of whole conversations: prompts left-padded to the longest, the rest right-padded."""
    B = len(seqs)
    P = max(plen)
    T = max(1, max(len(s) - p for s, p in zip(seqs, plen)))
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    att = torch.zeros((B, P + T), dtype=torch.long)
    resp = torch.zeros((B, T), dtype=torch.bool)
    blp = torch.zeros((B, T), dtype=torch.float)
    for i, (s, p) in enumerate(zip(seqs, plen)):
        r = len(s) - p
        ids[i, P - p : P + r] = torch.tensor(s, dtype=torch.long)
        att[i, P - p : P + r] = 1
        resp[i, :r] = torch.tensor(mine[i], dtype=torch.bool)
        blp[i, :r] = torch.tensor(behaviour[i], dtype=torch.float)
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    return Rollout(input_ids=ids.to(device), attention_mask=att.to(device), position_ids=pos.to(device),
                   prompt_len=P, response_mask=resp.to(device), behaviour_logprobs=blp.to(device),
                   truncated=torch.tensor([o.truncated for o in outcomes], device=device),
                   examples=rows, texts=[transcript_text(o) for o in outcomes], outcomes=outcomes)
