"""The repetition-loop diagnostic against hand-made sequences."""

from __future__ import annotations

import torch

from opdlm.ops.diagnostics import repetition_frac, tail_repeats


def test_tail_repeats_by_hand():
    assert tail_repeats([5, 1, 1, 1])  # a unigram three times
    assert tail_repeats([9, 1, 2, 1, 2, 1, 2])  # a bigram three times
    assert not tail_repeats([1, 2, 1, 2, 3])
    assert not tail_repeats([1, 1])  # too short
    assert not tail_repeats([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5], max_n=4)  # 5-gram is past max_n
    assert tail_repeats([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5], max_n=5)


def test_repetition_frac_ignores_padding_and_eos():
    eos, pad = 9, 0
    targets = torch.tensor([
        [3, 3, 3, eos, pad, pad],  # repeats before EOS
        [1, 2, 3, 4, eos, pad],    # clean
        [4, 5, 6, 6, pad, pad],    # the padding would look like a loop; length stops it
    ])
    lengths = torch.tensor([4, 5, 4])
    assert abs(repetition_frac(targets, lengths, eos).item() - 1 / 3) < 1e-7
