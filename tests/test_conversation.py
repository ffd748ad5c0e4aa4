"""Multi-turn rendering (opdlm.conversation): with the real Qwen tokenizer's chat template, a
conversation built piece by piece (prompt, action + end of turn, user turn, ...) is the template's
own rendering of the whole conversation; a template that does not end assistant turns with the EOS
token is refused in one line; without a template the pieces are the plain texts."""

from __future__ import annotations

import pytest
from conftest import qwen_tokenizer_dir

from opdlm.conversation import Conversation
from opdlm.errors import ConfigError
from opdlm.models import char_tokenizer, load_tokenizer


def test_piece_by_piece_equals_the_chat_templates_whole_conversation():
    tok = load_tokenizer(qwen_tokenizer_dir(), "tok")
    tok.eos_token = "<|im_end|>"  # an instruct model's end of turn
    conv = Conversation(tok, True)
    turns = [("go north", "-= Hall =-\nExits: east.\n>"), ("go east", "You see a coin.\n>")]
    ids, mine = conv.render("Find the coin.\n-= Room =-\n>", turns)
    msgs = [{"role": "user", "content": "Find the coin.\n-= Room =-\n>"}]
    for action, reply in turns:
        msgs.append({"role": "assistant", "content": action})
        if reply is not None:
            msgs.append({"role": "user", "content": reply})
    # the conversation so far, up to where the model writes its next action (the template renders a
    # last assistant turn differently, with an empty think block: that one is the model's to write)
    whole = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids) == whole
    assert ids == tok(whole, add_special_tokens=False)["input_ids"]
    learned = tok.decode([i for i, m in zip(ids, mine) if m])
    assert learned == "go north<|im_end|>go east<|im_end|>"


def test_a_template_without_the_eos_at_the_end_of_a_turn_is_refused():
    tok = load_tokenizer(qwen_tokenizer_dir(), "tok")
    tok.eos_token = "<|endoftext|>"  # the base model's EOS: assistant turns end with <|im_end|> instead
    with pytest.raises(ConfigError, match=r"^chat_template: the tokenizer's chat template does not end an assistant "
                                          r"turn with its eos_token '<\|endoftext\|>'"):
        Conversation(tok, True)


def test_without_a_template_the_pieces_are_the_texts():
    tok = char_tokenizer(["abc >\n"])
    conv = Conversation(tok, False)
    ids, mine = conv.render("ab\n>", [("c", "b\n>"), ("a", None)])
    assert tok.decode(ids) == "ab\n>c<|im_end|>b\n>a<|im_end|>"
    assert mine == [False] * 4 + [True, True] + [False] * 3 + [True, True]
