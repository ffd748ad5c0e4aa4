"""A generated mixed corpus for alignment tests and the alignment benchmark: math with <think>
tags, LaTeX, long numbers, Chinese, emoji, code, whitespace runs, decomposed accents (which Qwen's
NFC normaliser rewrites) and special-token strings typed as text. Seeded and reproducible."""

from __future__ import annotations

import random

_CJK = "我们计算这个数的平方根然后加上三得到结果因为所以答案是多少"
_EMOJI = ["🙂", "🚀", "👍🏽", "🧮", "✅", "🇫🇷", "👨‍👩‍👧"]
_WORDS = ["First", "compute", "the", "sum", "then", "divide", "by", "so", "answer", "is", "Wait",
          "check", "again", "therefore", "value", "each", "term"]


def _number(r: random.Random) -> str:
    return str(r.randint(0, 10 ** r.randint(1, 12)))


def _piece(r: random.Random) -> str:
    kind = r.randrange(9)
    if kind == 0:
        a, b = _number(r), _number(r)
        return f"<think>{a}+{b}={int(a) + int(b)};</think>"
    if kind == 1:
        return f"$\\frac{{{_number(r)}}}{{{r.randint(1, 99)}}} \\cdot \\sqrt{{{r.randint(2, 999)}}}$ \\boxed{{{_number(r)}}}"
    if kind == 2:
        return "".join(r.choice(_CJK) for _ in range(r.randint(2, 12)))
    if kind == 3:
        return " ".join(r.choice(_EMOJI) for _ in range(r.randint(1, 4)))
    if kind == 4:
        return f"def f(x):\n    return x ** {r.randint(2, 9)}  # {r.choice(_WORDS)}\n"
    if kind == 5:
        return r.choice(["  ", "\t", "\n\n", "   \n", " \t "]) * r.randint(1, 3)
    if kind == 6:
        return "cafe\u0301 na\u0308ive"  # decomposed accents: NFC changes these bytes
    if kind == 7:
        return r.choice(["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|begin_of_text|>"])
    return " ".join(r.choice(_WORDS) for _ in range(r.randint(1, 8)))


def mixed_corpus(n: int, seed: int = 0, pieces: tuple[int, int] = (3, 12), normalised: bool = False) -> list[str]:
    """``n`` texts of a few mixed pieces each; ``normalised`` leaves out decomposed accents."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(r.randint(*pieces)):
            p = _piece(r)
            while normalised and "\u0301" in p:
                p = _piece(r)
            parts.append(p)
        out.append(" ".join(parts))
    return out
