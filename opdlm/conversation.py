"""How a multi-turn episode becomes tokens, one way for sampling, SFT on expert transcripts and the
teacher: the first user turn is the prompt; each action is the model's tokens followed by its end
of turn (the tokenizer's EOS); each later observation is a user turn appended after that EOS,
ending where the next action starts.

Without a chat template a user turn is its text alone (the task's turn template puts a cue such as
"\\n>" at its end). With one, a later user turn is the text the template puts between an
assistant's end of turn and the next assistant message, measured once by rendering a probe
conversation; a template that does not end assistant turns with the EOS token cannot be used for
multi-turn play and is refused with one line.
"""

from __future__ import annotations

from typing import Any

from opdlm.errors import ConfigError
from opdlm.models import render_prompt


class Conversation:
    """Token ids of the pieces of a multi-turn conversation for one tokenizer and template mode."""

    def __init__(self, tokenizer: Any, chat_template: bool) -> None:
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ConfigError("sampler: the tokenizer has no eos_token, so an action could not end its turn")
        self.before, self.after = "", ""
        if chat_template:
            self.before, self.after = _user_turn_frame(tokenizer)

    def first(self, user_text: str) -> list[int]:
        """The prompt: the first user turn, up to where the first action starts."""
        return render_prompt(self.tokenizer, user_text, self.chat_template)

    def user(self, user_text: str) -> list[int]:
        """A later user turn, appended after an action's end of turn, up to where the next action starts."""
        return self.tokenizer(self.before + user_text + self.after, add_special_tokens=False)["input_ids"]

    def action(self, text: str) -> list[int]:
        """An action as the model writes it: its tokens, then the end of turn."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos]

    def render(self, first_user: str, turns: list[tuple[str, str | None]]) -> tuple[list[int], list[bool]]:
        """The whole conversation: ids and, per id, whether the model wrote it (action tokens and
        their end of turn). ``turns``: (action, the user turn that answers it, or None after the last)."""
        ids = self.first(first_user)
        mine = [False] * len(ids)
        for action, reply in turns:
            a = self.action(action)
            ids += a
            mine += [True] * len(a)
            if reply is not None:
                u = self.user(reply)
                ids += u
                mine += [False] * len(u)
        return ids, mine


def _user_turn_frame(tokenizer: Any) -> tuple[str, str]:
    """(text before, text after) a user message that follows an assistant turn's EOS token in the
    tokenizer's chat template, the next assistant turn's opening included in the second."""
    eos_text = tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id)
    a, b, c = "\u2401A\u2401", "\u2401B\u2401", "\u2401C\u2401"
    msgs = [{"role": "user", "content": a}, {"role": "assistant", "content": b}]
    try:
        full = tokenizer.apply_chat_template(msgs + [{"role": "user", "content": c}], add_generation_prompt=True,
                                             tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template that cannot render a conversation
        raise ConfigError(f"chat_template: the tokenizer's chat template cannot render a multi-turn conversation "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    end = full.find(b)
    rest = full[end + len(b):] if end >= 0 else ""
    if end < 0 or not rest.startswith(eos_text) or c not in rest:
        raise ConfigError(f"chat_template: the tokenizer's chat template does not end an assistant turn with its "
                          f"eos_token {eos_text!r}, so multi-turn actions could not stop at the end of a turn")
    rest = rest[len(eos_text):]
    i = rest.index(c)
    return rest[:i], rest[i + len(c):]
