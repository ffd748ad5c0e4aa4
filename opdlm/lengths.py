"""Inputs longer than the models' positions are never silent: checked before any weights load.

An SFT example needs prompt + solution + end of turn positions; a prompt that is sampled from
(OPD training, validation and test) needs prompt + sampler.max_new_tokens. Both the teacher and the
student are checked where they read the example. ``data.too_long`` chooses what happens:
``error`` stops with one line naming the split, the example (its jsonl line where there is one),
the lengths and the model; ``skip`` leaves such examples out of their split, and the run prints
how many per split.

Most examples are cleared without tokenising them: a text's tokens are at most its UTF-8 bytes (every
token of a byte-level, character or SentencePiece tokenizer covers at least one byte), plus the chat
template's own tokens (measured on an empty prompt) and a margin. The rest are tokenised in one batch,
and those within a few tokens of a limit are rendered exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from opdlm.conversation import Conversation
from opdlm.errors import ConfigError
from opdlm.models import render_prompt
from opdlm.plugin_api import Task
from opdlm.types import Example

SPLITS = ("train", "val", "test")
SLACK = 4  # tokens the template's boundaries may add or merge away
MARGIN = 8  # tokens a text may have beyond its UTF-8 bytes (a prefix space, special handling)


class FilteredTask(Task):
    """A task with some examples left out of its splits (data.too_long: skip)."""

    def __init__(self, task: Task, keep: dict[str, list[bool]]) -> None:
        self.inner = task
        self.plugin_name, self.plugin_kind = task.plugin_name, task.plugin_kind
        self._splits = {s: [e for e, k in zip(task.examples(s), keep[s]) if k] for s in SPLITS}

    def bind(self, ctx: Any) -> None:
        self.inner.bind(ctx)

    @property
    def interactive(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.inner, "interactive", False))

    def start(self, example: Example) -> Any:
        return self.inner.start(example)

    def user_turn(self, observation: str) -> str:
        return self.inner.user_turn(observation)

    def examples(self, split: str) -> list[Example]:
        return self._splits[split]

    def verify(self, response: str, example: Example) -> bool:
        return self.inner.verify(response, example)

    def extract(self, response: str) -> str | None:
        return self.inner.extract(response)

    def corpus(self) -> Iterable[str]:
        return self.inner.corpus()

    def summary(self) -> str | None:
        return self.inner.summary()


def _limit_key(role: str, spec: Any) -> str:
    if spec.served:
        return f"{role}.server (the served model's max_model_len)"
    return f"{role}.max_positions" if not spec.path else f"{role}.path (max_position_embeddings)"


def _overhead(spec: Any, chat: bool) -> int:
    return len(render_prompt(spec.tokenizer, "", True)) if chat else 0


def _lengths(spec: Any, texts: list[str], chat: bool, need: list[bool]) -> list[int]:
    """Token counts of ``texts`` (+ the template's tokens) where ``need``; a byte bound elsewhere."""
    out = [len(t.encode()) + MARGIN for t in texts]
    idx = [i for i, n in enumerate(need) if n]
    if idx:
        tok = spec.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        batch = [texts[i] for i in idx]
        counts = ([len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False)] if backend is not None
                  else [len(ids) for ids in tok(batch, add_special_tokens=False)["input_ids"]])
        for i, n in zip(idx, counts):
            out[i] = n
    extra = _overhead(spec, chat)
    return [n + extra for n in out]


def _where(ex: Example, split: str, i: int) -> str:
    line = ex.meta.get("line") if isinstance(ex.meta, dict) else None
    return f"{split} example {i}" + (f" (line {line} of the task's file)" if line else "")


def check_lengths(cfg: dict[str, Any], task: Task, teacher: Any, student: Any) -> tuple[Task, dict[str, int]]:
    """The task (filtered when data.too_long is skip) and the number of examples left out per split."""
    mode = cfg["data"]["too_long"]
    if getattr(task, "interactive", False):
        return _check_interactive(cfg, task, teacher, student)
    new_tokens = cfg["sampler"]["max_new_tokens"]
    keep = {s: [True] * len(task.examples(s)) for s in SPLITS}
    checks = []  # (role, spec, needs SFT solutions)
    for role, spec in (("teacher", teacher), ("student", student)):
        if spec.positions is not None:
            checks.append((role, spec, cfg["stages"][f"{role}_sft"]["steps"] > 0))
    for role, spec, sft in checks:
        limit = spec.positions
        chat = bool(spec.node["chat_template"])
        extra = _overhead(spec, chat)
        for split in SPLITS:
            exs = task.examples(split)
            with_sol = sft and split == "train"
            bound = [len(e.prompt.encode()) + MARGIN + extra
                     + (max(new_tokens, len((e.solution or "").encode()) + MARGIN + 1) if with_sol else new_tokens)
                     for e in exs]
            near = [b > limit - SLACK for b in bound]  # only these can be too long
            prompts = _lengths(spec, [e.prompt for e in exs], chat, near)
            sols = _lengths(spec, [e.solution or "" for e in exs], False, near) if with_sol else None
            for i, ex in enumerate(exs):
                if not keep[split][i]:
                    continue
                need, what = prompts[i] + new_tokens, f"prompt {prompts[i]} + sampler.max_new_tokens {new_tokens}"
                if sols is not None:
                    sft_need = prompts[i] + sols[i] + 1
                    if sft_need > need:
                        need, what = sft_need, f"prompt {prompts[i]} + solution {sols[i]} + end of turn"
                if need <= limit - SLACK or not _exact_too_long(spec, ex, chat, need, limit, sols is not None, new_tokens):
                    continue
                if mode == "error":
                    key = _limit_key(role, spec)
                    raise ConfigError(f"task: {_where(ex, split, i)} needs {need} positions ({what}) for the {role}, "
                                      f"more than its {limit} ({key}); set data.too_long=skip to leave such examples out")
                keep[split][i] = False
    dropped = {s: keep[s].count(False) for s in SPLITS}
    if not any(dropped.values()):
        return task, dropped
    filtered = FilteredTask(task, keep)
    if not filtered.examples("test"):
        raise ConfigError("data.too_long: skip left the test split empty: every test example is too long for the models")
    return filtered, dropped


def _exact_too_long(spec: Any, ex: Example, chat: bool, estimate: int, limit: int, sft: bool, new_tokens: int) -> bool:
    """Whether an example near the limit is really over it (its prompt rendered exactly)."""
    if estimate > limit + SLACK or not chat:
        return estimate > limit
    prompt = len(render_prompt(spec.tokenizer, ex.prompt, True))
    need = prompt + new_tokens
    if sft:
        sol = len(spec.tokenizer(ex.solution or "", add_special_tokens=False)["input_ids"])
        need = max(need, prompt + sol + 1)
    return need > limit


def _check_interactive(cfg: dict[str, Any], task: Task, teacher: Any, student: Any) -> tuple[Task, dict[str, int]]:
    """Played tasks: a conversation grows up to sampler.max_context tokens, which both models must
    hold; an expert transcript learned by SFT must fit whole (data.too_long: skip leaves it out)."""

    context = cfg["sampler"].get("max_context")
    new_tokens = cfg["sampler"]["max_new_tokens"]
    keep = {s: [True] * len(task.examples(s)) for s in SPLITS}

    def too_long(split: str, i: int, message: str) -> None:  # data.too_long: error stops, skip leaves it out
        if cfg["data"]["too_long"] == "error":
            raise ConfigError(message)
        keep[split][i] = False

    for role, spec in (("teacher", teacher), ("student", student)):
        conv = Conversation(spec.tokenizer, bool(spec.node["chat_template"]))  # a template that cannot: one line now
        if role == "student" and context is not None:  # the first turn must leave room for an action
            for split in SPLITS:
                for i, ex in enumerate(task.examples(split)):
                    need = len(conv.first(ex.prompt)) + new_tokens
                    if need > context and keep[split][i]:
                        too_long(split, i, f"sampler.max_context: {split} example {i} ({ex.meta.get('game')}) needs "
                                           f"{need} tokens for its first turn (prompt + sampler.max_new_tokens "
                                           f"{new_tokens}), more than {context}; raise it, or set data.too_long=skip "
                                           f"to leave such games out")
        limit = spec.positions
        if limit is None:
            continue
        key = _limit_key(role, spec)
        if context is not None and context > limit:
            raise ConfigError(f"sampler.max_context: {context} tokens of conversation do not fit in the {role}'s "
                              f"{limit} positions ({key}); lower it or give the model more positions")
        if cfg["stages"][f"{role}_sft"]["steps"] == 0:
            continue
        for i, ex in enumerate(task.examples("train")):
            if not ex.meta.get("turns") or not keep["train"][i]:
                continue
            need = len(conv.render(ex.prompt, ex.meta["turns"])[0])
            if need > limit:
                too_long("train", i, f"task: the expert transcript of train example {i} ({ex.meta.get('game')}) "
                                     f"needs {need} positions for the {role}, more than its {limit} ({key}); set "
                                     f"data.too_long=skip to leave such examples out")
    dropped = {s: keep[s].count(False) for s in SPLITS}
    if dropped["test"] == len(keep["test"]):
        raise ConfigError("data.too_long: skip left the test split empty: every test game is too long for the budgets")
    return (FilteredTask(task, keep) if any(dropped.values()) else task), dropped
