"""Maskers: special-token masking (first occurrence per response; multi-token strings mask the
first occurrence of each of their ids unless strict)."""

from __future__ import annotations

import plugin_testkit
import pytest
import torch

from opdlm.errors import ConfigError
from opdlm.registry import MASKERS

kit = plugin_testkit
make_rollout = kit.build_rollout
make_view = kit.build_view
make_ctx = kit.make_ctx
char_tok = kit.char_tok()


def _special(tokens, ctx):
    m = MASKERS.build({"name": "special_tokens", "tokens": tokens}, "masker")
    m.bind(ctx)
    return m


def _reference_drop(targets: torch.Tensor, response: torch.Tensor, ids: set[int]) -> torch.Tensor:
    """Brute force: walk each response, drop the first in-response occurrence of each id."""
    keep = torch.ones_like(targets, dtype=torch.bool)
    for b in range(targets.shape[0]):
        seen: set[int] = set()
        for t in range(targets.shape[1]):
            tok = int(targets[b, t])
            if response[b, t] and tok in ids and tok not in seen:
                keep[b, t] = False
                seen.add(tok)
    return keep


def test_resolves_strings_through_the_tokenizer():
    m = _special(["<think>", "</think>", "<|im_end|>", "+"], make_ctx())
    vocab = char_tok.get_vocab()
    assert sorted(m.ids.tolist()) == sorted({vocab["<think>"], vocab["</think>"], vocab["<|im_end|>"], vocab["+"]})
    # duplicates collapse to one id
    m2 = _special(["<think>", "<think>"], make_ctx())
    assert m2.ids.tolist() == [vocab["<think>"]]


@pytest.mark.parametrize("seed", range(4))
def test_drops_first_occurrence_per_response(seed):
    strings = ["<think>", "</think>", "<|im_end|>"]
    m = _special(strings, make_ctx())
    vocab = char_tok.get_vocab()
    special = {vocab[s] for s in strings}
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 12
    pool = torch.tensor(sorted(special) + [vocab["1"], vocab["+"], vocab["="]])
    targets = pool[torch.randint(len(pool), (B, T), generator=g)]
    response = torch.rand(B, T, generator=g) < 0.75  # arbitrary, not only a prefix
    rollout = make_rollout(targets, response)
    got = m.mask(rollout, make_view(rollout))
    want = _reference_drop(targets, response, special)
    assert got.dtype == torch.bool and got.shape == (B, T)
    assert torch.equal(got, want)
    assert (~want).sum() >= B  # something was dropped
    # a later occurrence is kept: there is at least one repeated special id kept in the response
    assert ((targets.unsqueeze(-1) == torch.tensor(sorted(special))).any(-1) & response & got).any()


def test_occurrence_outside_response_is_ignored():
    m = _special(["<think>"], make_ctx())
    th = char_tok.get_vocab()["<think>"]
    one = char_tok.get_vocab()["1"]
    targets = torch.tensor([[th, th, one, th], [one, th, th, one]])
    response = torch.tensor([[False, True, True, True], [True, True, True, False]])
    rollout = make_rollout(targets, response)
    got = m.mask(rollout, make_view(rollout))
    want = torch.tensor([[True, False, True, True], [True, False, True, True]])
    assert torch.equal(got, want)


def test_response_without_special_tokens_keeps_everything():
    m = _special(["<|im_end|>"], make_ctx())
    targets = torch.full((2, 5), char_tok.get_vocab()["7"])
    rollout = make_rollout(targets)
    assert m.mask(rollout, make_view(rollout)).all()


def test_multi_token_string_masks_the_first_occurrence_of_each_of_its_ids():
    vocab = char_tok.get_vocab()
    one, plus, eq = vocab["1"], vocab["+"], vocab["="]
    m = _special(["1+"], make_ctx())  # two ids in the char tokenizer
    assert sorted(m.ids.tolist()) == sorted([one, plus])
    targets = torch.tensor([[eq, plus, one, plus, one], [one, one, eq, eq, plus]])
    rollout = make_rollout(targets)
    want = _reference_drop(targets, torch.ones_like(targets, dtype=torch.bool), {one, plus})
    assert torch.equal(m.mask(rollout, make_view(rollout)), want)
    assert want.tolist() == [[True, False, False, True, True], [False, True, True, True, False]]
    strict = MASKERS.build({"name": "special_tokens", "tokens": ["<think>", "1+"], "strict": True}, "masker")
    with pytest.raises(ConfigError, match=r"^tokens: '1\+' is not a single token of the student tokenizer .*strict: false"):
        strict.bind(make_ctx())


@pytest.mark.parametrize("bad", ["think", "zz", "<"])
def test_string_with_characters_the_tokenizer_lacks_raises_at_bind(bad):
    m = MASKERS.build({"name": "special_tokens", "tokens": ["<think>", bad]}, "masker")
    with pytest.raises(ConfigError) as e:
        m.bind(make_ctx())
    msg = str(e.value)
    assert "tokens" in msg and f"'{bad}'" in msg


def test_default_list_is_the_papers_and_fails_loudly_on_a_char_tokenizer():
    m = MASKERS.build({"name": "special_tokens"}, "masker")
    assert m.tokens == ["<", "think", "<|im_end|>"]
    with pytest.raises(ConfigError, match="'<'"):
        m.bind(make_ctx())


def test_empty_string_rejected_at_build():
    with pytest.raises(ConfigError, match=r"^masker\.tokens:"):
        MASKERS.build({"name": "special_tokens", "tokens": ["<think>", ""]}, "masker")


def test_mask_before_bind_is_an_error():
    m = MASKERS.build({"name": "special_tokens", "tokens": ["<think>"]}, "masker")
    rollout = make_rollout(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(RuntimeError):
        m.mask(rollout, make_view(rollout))
