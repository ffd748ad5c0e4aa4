"""Per-prompt evaluation metrics the way papers report them, from n sampled responses per prompt:
avg@n (the mean correctness), pass@k (the unbiased estimator of Chen et al. 2021 from n >= k
samples) and maj@k (majority vote over the answers of k samples)."""

from __future__ import annotations

from collections import Counter
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from the n is correct), with c of the
    n correct: 1 - C(n - c, k) / C(n, k)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: list[str | None], correct: list[bool], k: int) -> bool:
    """maj@k of one prompt: the most frequent answer among the first k samples (None: a sample whose
    answer could not be read, which does not vote; ties go to the answer seen first) is correct.
    False when no sample gave an answer."""
    votes = [(a, ok) for a, ok in zip(answers[:k], correct[:k]) if a is not None]
    if not votes:
        return False
    counts = Counter(a for a, _ in votes)
    best = max(counts.values())
    winner = next(a for a, _ in votes if counts[a] == best)
    return next(ok for a, ok in votes if a == winner)
