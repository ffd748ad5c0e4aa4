"""Generated arithmetic task: determinism, disjoint splits, correct reference solutions, verifier."""

from __future__ import annotations

import re

import pytest

from opdlm.discovery import discover
from opdlm.errors import ConfigError
from opdlm.registry import TASKS
from opdlm.types import Example

discover()

SMALL = {"n_train": 150, "n_val": 20, "n_test": 30}


def _task(**opts):
    return TASKS.build({"name": "arithmetic", **SMALL, **opts}, "task")


def _fold(expr: str) -> tuple[int, list[tuple[int, str, int, int]]]:
    """Left-to-right evaluation of 'a op b op c ...' (no precedence) and its steps, by hand."""
    nums, ops, cur = [], [], ""
    for ch in expr:
        if ch.isdigit():
            cur += ch
        else:
            nums.append(int(cur))
            ops.append(ch)
            cur = ""
    nums.append(int(cur))
    acc, steps = nums[0], []
    for op, b in zip(ops, nums[1:]):
        if op == "+":
            new = acc + b
        elif op == "-":
            new = acc - b
        else:
            assert op == "*"
            new = acc * b
        steps.append((acc, op, b, new))
        acc = new
    return acc, steps


def _all(task) -> dict[str, list[Example]]:
    return {s: task.examples(s) for s in ("train", "val", "test")}


def test_deterministic_from_seed():
    a, b, c = _all(_task(seed=5)), _all(_task(seed=5)), _all(_task(seed=6))
    for s in ("train", "val", "test"):
        assert [e.prompt for e in a[s]] == [e.prompt for e in b[s]]
        assert [e.solution for e in a[s]] == [e.solution for e in b[s]]
    assert [e.prompt for e in a["train"]] != [e.prompt for e in c["train"]]
    assert [e.prompt for e in a["test"]] != [e.prompt for e in c["test"]]


def test_split_sizes_and_disjointness():
    splits = _all(_task(seed=1))
    assert {s: len(v) for s, v in splits.items()} == {"train": 150, "val": 20, "test": 30}
    exprs = {s: [e.meta["expr"] for e in v] for s, v in splits.items()}
    for s in exprs:
        assert len(set(exprs[s])) == len(exprs[s])
    assert not set(exprs["train"]) & set(exprs["val"])
    assert not set(exprs["train"]) & set(exprs["test"])
    assert not set(exprs["val"]) & set(exprs["test"])
    with pytest.raises(ValueError):
        _task().examples("dev")


@pytest.mark.parametrize("ops", ["+-", "+-*", "*"])
def test_reference_solutions_are_correct_arithmetic(ops):
    task = _task(seed=2, ops=ops, min_terms=2, max_terms=4, max_operand=12)
    for ex in task.examples("train") + task.examples("test"):
        expr = ex.meta["expr"]
        assert ex.prompt == expr + "="
        assert set(re.sub(r"\d", "", expr)) <= set(ops)
        operands = [int(x) for x in re.findall(r"\d+", expr)]
        assert 2 <= len(operands) <= 4 and all(0 <= x <= 12 for x in operands)
        value, steps = _fold(expr)
        assert ex.answer == str(value)
        m = re.fullmatch(r"<think>(.*)</think>\\boxed\{(-?\d+)\}", ex.solution)
        assert m, ex.solution
        assert int(m.group(2)) == value
        written = m.group(1).split(";")
        assert written == [f"{a}{op}{b}={c}" for a, op, b, c in steps]
        assert task.verify(ex.solution, ex)


def test_prompt_template():
    task = _task(prompt_template="Compute {expr} now:")
    ex = task.examples("val")[0]
    assert ex.prompt == f"Compute {ex.meta['expr']} now:"


def test_verify():
    task = _task()
    ex = task.make_example("2-9+1")
    assert ex.answer == "-6"
    assert task.verify("\\boxed{-6}", ex)
    assert task.verify("<think>2-9=-7;-7+1=-6</think>\\boxed{ -6 }", ex)
    assert task.verify("\\boxed{3} then \\boxed{-6}", ex)  # the last box counts
    assert not task.verify("\\boxed{-6} then \\boxed{3}", ex)
    assert not task.verify("\\boxed{6}", ex)
    assert not task.verify("-6", ex)  # no \boxed
    assert not task.verify("\\boxed{}", ex)
    assert not task.verify("\\boxed{minus six}", ex)
    assert not task.verify("<think>2-9=-7;-7+1=-6</think>", ex)
    prod = task.make_example("3*4-5")
    assert prod.answer == "7" and task.verify("\\boxed{7}", prod)


@pytest.mark.parametrize("opts,key", [
    ({"min_terms": 1}, "min_terms"),
    ({"min_terms": 4, "max_terms": 3}, "max_terms"),
    ({"max_operand": 0}, "max_operand"),
    ({"ops": "/"}, "ops"),
    ({"ops": "+/"}, "ops"),
    ({"ops": ""}, "ops"),
    ({"n_val": 0}, "n_val"),
    ({"prompt_template": "no placeholder"}, "prompt_template"),
    ({"min_terms": 2, "max_terms": 2, "max_operand": 2, "ops": "+"}, "n_train"),  # only 9 problems exist
])
def test_out_of_range_options(opts, key):
    with pytest.raises(ConfigError) as e:
        _task(**opts)
    assert str(e.value).startswith(f"task.{key}:")


def test_corpus_covers_solutions():
    task = _task(ops="+-*")
    chars = set("".join(task.corpus()))
    for ex in task.examples("train")[:50]:
        assert set(ex.prompt + ex.solution.replace("<think>", "").replace("</think>", "")) <= chars
