"""Generated multi-step integer arithmetic with a verifiable answer.

Prompt ``3+9-8+5=``; reference solution ``<think>3+9=12;12-8=4;4+5=9</think>\\boxed{9}``: the
running result is written out after every operation inside <think>, the answer in \\boxed{}.
Problems are drawn from ``seed``; the test, val and train splits hold disjoint expressions.
Options: seed, min_terms/max_terms (operands per problem), max_operand (operands are 0..max),
ops (operators to draw from, a subset of "+-*"), n_train/n_val/n_test, prompt_template (``{expr}``
is replaced by the expression).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from opdlm.errors import ConfigError
from opdlm.plugin_api import Task
from opdlm.registry import TASKS
from opdlm.types import Example

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def boxed_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} (no nested braces), or None."""
    found = BOXED.findall(text)
    return found[-1].strip() if found else None


@TASKS.register("arithmetic")
class Arithmetic(Task):
    """Multi-step integer arithmetic, reasoning in <think>, answer in \\boxed{} (generated)."""

    def __init__(self, *, seed: int = 0, min_terms: int = 3, max_terms: int = 5,
                 max_operand: int = 9, ops: str = "+-", n_train: int = 20000, n_val: int = 200,
                 n_test: int = 500, prompt_template: str = "{expr}=") -> None:
        if min_terms < 2:
            raise ConfigError(f"min_terms: must be >= 2, got {min_terms}")
        if max_terms < min_terms:
            raise ConfigError(f"max_terms: must be >= min_terms ({min_terms}), got {max_terms}")
        if max_operand < 1:
            raise ConfigError(f"max_operand: must be >= 1, got {max_operand}")
        if not ops or set(ops) - set("+-*"):
            raise ConfigError(f"ops: must be a non-empty subset of '+-*', got '{ops}'")
        for k, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if v < 1:
                raise ConfigError(f"{k}: must be >= 1, got {v}")
        if "{expr}" not in prompt_template:
            raise ConfigError(f"prompt_template: must contain '{{expr}}', got '{prompt_template}'")
        space = sum((max_operand + 1) ** t * len(ops) ** (t - 1) for t in range(min_terms, max_terms + 1))
        need = n_train + n_val + n_test
        if need > space // 2:
            raise ConfigError(
                f"n_train: {need} problems requested but only {space} distinct ones exist; "
                f"lower n_train/n_val/n_test or widen max_terms/max_operand"
            )
        self.seed, self.min_terms, self.max_terms = seed, min_terms, max_terms
        self.max_operand, self.ops, self.template = max_operand, ops, prompt_template
        self.sizes = {"test": n_test, "val": n_val, "train": n_train}
        self._splits: dict[str, list[Example]] | None = None

    def _draw(self, rng: random.Random) -> str:
        n = rng.randint(self.min_terms, self.max_terms)
        parts = [str(rng.randint(0, self.max_operand))]
        for _ in range(n - 1):
            parts += [rng.choice(self.ops), str(rng.randint(0, self.max_operand))]
        return "".join(parts)

    def make_example(self, expr: str) -> Example:
        """The example for an expression like '3+9-8' (left to right, no precedence)."""
        tokens = re.findall(r"\d+|[+\-*]", expr)
        acc = int(tokens[0])
        steps = []
        for op, num in zip(tokens[1::2], tokens[2::2]):
            b = int(num)
            new = acc + b if op == "+" else acc - b if op == "-" else acc * b
            steps.append(f"{acc}{op}{b}={new}")
            acc = new
        solution = "<think>" + ";".join(steps) + "</think>\\boxed{" + str(acc) + "}"
        return Example(prompt=self.template.replace("{expr}", expr), answer=str(acc),
                       solution=solution, meta={"expr": expr})

    def _build(self) -> dict[str, list[Example]]:
        rng = random.Random(self.seed)
        seen: set[str] = set()
        out: dict[str, list[Example]] = {}
        for split in ("test", "val", "train"):  # held-out splits first: train never overlaps
            items: list[Example] = []
            while len(items) < self.sizes[split]:
                expr = self._draw(rng)
                if expr in seen:
                    continue
                seen.add(expr)
                items.append(self.make_example(expr))
            out[split] = items
        return out

    def examples(self, split: str) -> list[Example]:
        if split not in self.sizes:
            raise ValueError(f"unknown split '{split}'; choices: train, val, test")
        if self._splits is None:
            self._splits = self._build()
        return self._splits[split]

    def verify(self, response: str, example: Example) -> bool:
        got = boxed_answer(response)
        if got is None:
            return False
        try:
            return int(got) == int(example.answer)
        except ValueError:
            return False

    def extract(self, response: str) -> str | None:
        got = boxed_answer(response)
        try:
            return str(int(got)) if got is not None else None
        except ValueError:
            return None

    def corpus(self) -> Iterable[str]:
        digits = "".join(str(i) for i in range(10))
        yield digits + self.ops + "=;-{}\\boxed" + self.template.replace("{expr}", "")
        ex = self.make_example("1-2")
        yield ex.prompt + (ex.solution or "")
