"""Interactive text games: an environment plugin's games, played turn by turn (sampler
``multi_turn``), scored by whether the episode is won.

An example is one game: its prompt is the first user turn (the game's first observation in
``turn_template``), ``meta["game"]`` the game to start, and, for SFT, ``meta["turns"]`` the expert's
transcript: (action, the user turn that answers it; None after the winning action), recorded once
by playing the game's walkthrough and kept next to the game file (``<game>.transcript.json``; only
a walkthrough that wins is kept).
``solution`` is the expert's actions, one per line (the text a tiny tokenizer is trained on).

Options: env (an environment node; its name defaults to textworld), turn_template (the text of a user
turn; ``{observation}`` is replaced by the observation; default "{observation}\\n>").
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from opdlm.errors import ConfigError
from opdlm.plugin_api import Environment, Episode, Task
from opdlm.registry import ENVIRONMENTS, TASKS
from opdlm.types import Example

SPLITS = ("train", "val", "test")


@TASKS.register("text_game")
class TextGame(Task):
    """Text games of an environment plugin, played turn by turn; success = the episode is won."""

    interactive = True
    nested_nodes = {"env": ("environment", {})}

    def __init__(self, *, env: dict[str, Any] | None = None, turn_template: str = "{observation}\n>") -> None:
        if "{observation}" not in turn_template:
            raise ConfigError(f"turn_template: must contain '{{observation}}', got {turn_template!r}")
        self.turn_template = turn_template
        self.environment: Environment = ENVIRONMENTS.build({"name": "textworld", **(env or {})}, "env")
        self._splits: dict[str, list[Example]] = {}

    def user_turn(self, observation: str) -> str:
        """The text of the user turn that shows ``observation``."""
        return self.turn_template.replace("{observation}", observation)

    def start(self, example: Example) -> Episode:
        """A new episode of the example's game."""
        return self.environment.start(example.meta["game"])

    def transcript(self, game: str) -> dict[str, Any]:
        """The first observation and the expert's turns of ``game`` (played once, then read from
        ``<game>.transcript.json``)."""
        cache = Path(game).with_suffix(".transcript.json")
        if cache.is_file():
            try:
                return json.loads(cache.read_text())
            except (OSError, ValueError):
                pass  # a damaged record is made again
        ep = self.environment.start(game)
        try:
            first, plan, turns = ep.observation, ep.walkthrough(), []
            for action in plan or []:
                step = ep.step(action)
                turns.append([action, None if step.done else step.observation])
                if step.done:
                    break
            won = ep.won
        finally:
            ep.close()
        record = {"first": first, "turns": turns if plan else None, "won": won}
        if not won:  # not kept: it may depend on the environment's options (a move limit below the walkthrough)
            return record
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(record))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only cache: the record is made again next time
        return record

    def examples(self, split: str) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; choices: {', '.join(SPLITS)}")
        if split not in self._splits:
            items = []
            for game in self.environment.games(split):
                rec = self.transcript(game)
                expert = rec["turns"] if rec["won"] else None  # a walkthrough that does not win is no expert
                turns = None if expert is None else [(a, None if o is None else self.user_turn(o)) for a, o in expert]
                items.append(Example(prompt=self.user_turn(rec["first"]), answer="won",
                                     solution=None if turns is None else "\n".join(a for a, _ in turns),
                                     meta={"game": game, "turns": turns}))
            self._splits[split] = items
        return self._splits[split]

    def verify(self, response: str, example: Example) -> bool:
        raise RuntimeError("text_game: episodes are scored by play (Rollout.outcomes), not by their text")

    def corpus(self) -> Iterable[str]:
        yield string.printable  # observations of unseen games may use any printable character
        for split in SPLITS:
            for ex in self.examples(split):
                yield ex.prompt
                for action, reply in ex.meta["turns"] or []:
                    yield action + (reply or "")
