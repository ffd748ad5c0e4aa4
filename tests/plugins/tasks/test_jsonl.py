"""JSONL task: reading fields, splits, error messages, and the math answer verifier."""

from __future__ import annotations

import json
import random

import pytest

from opdlm.discovery import discover
from opdlm.errors import ConfigError
from opdlm.registry import TASKS
from opdlm.types import Example

discover()


def _write(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _task(**opts):
    return TASKS.build({"name": "jsonl", **opts}, "task")


def _split_prompts(task) -> dict[str, list[str]]:
    return {s: [e.prompt for e in task.examples(s)] for s in ("train", "val", "test")}


def test_reads_configured_fields(tmp_path):
    rows = [{"q": f"question {i}", "a": str(i), "sol": f"\\boxed{{{i}}}", "other": 1} for i in range(5)]
    path = _write(tmp_path / "d.jsonl", rows)
    task = _task(path=path, prompt_field="q", answer_field="a", solution_field="sol",
                 val_fraction=0.0, test_fraction=0.0)
    got = task.examples("train")
    assert sorted((e.prompt, e.answer, e.solution) for e in got) == sorted(
        (r["q"], r["a"], r["sol"]) for r in rows)
    assert task.examples("val") == [] and task.examples("test") == []
    with pytest.raises(ValueError):
        task.examples("dev")


def test_default_fields_and_non_string_answer(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "p", "answer": 42}])
    ex = _task(path=path, val_fraction=0.0, test_fraction=0.0).examples("train")[0]
    assert ex.prompt == "p" and ex.answer == "42" and ex.solution is None


DIGITS = "7" * 5000


@pytest.mark.parametrize("line,opts,expected", [
    ('{"prompt": 5, "answer": "1"}', {}, '"prompt" must be a string, got 5'),
    ('{"prompt": "b", "answer": null}', {}, '"answer" must be a string or an integer, got null'),
    ('{"prompt": "b", "answer": "1", "sol": ["step 1", "step 2"]}', {"solution_field": "sol"},
     '"sol" (solution_field) must be a string, got ["step 1", "step 2"]'),
    ('{"prompt": "b", "answer": "1", "sol": null}', {"solution_field": "sol"},
     '"sol" (solution_field) must be a string, got null'),
    ('{"q": 3, "answer": "1"}', {"prompt_field": "q"}, '"q" (prompt_field) must be a string, got 3'),
    ('{"prompt": "b", "answer": 1e400}', {},
     '"answer" must be a string or an integer, got 1e400 (write a decimal answer as a string: "1e400")'),
    ('{"prompt": "b", "answer": NaN}', {}, '"answer" must be a string or an integer, got NaN'),
    ('{"prompt": "b", "answer": -Infinity}', {}, '"answer" must be a string or an integer, got -Infinity'),
    ('{"prompt": "b", "answer": 0.50}', {},
     '"answer" must be a string or an integer, got 0.50 (write a decimal answer as a string: "0.50")'),
    ('{"prompt": "b", "answer": true}', {}, '"answer" must be a string or an integer, got true'),
    ('{"prompt": "b", "answer": {"value": 2}}', {}, '"answer" must be a string or an integer, got {"value": 2}'),
    ('{"prompt": ' + DIGITS + ', "answer": "1"}', {},
     f'"prompt" must be a string, got {DIGITS[:40]}… (5,000 characters)'),
], ids=["number-prompt", "null-answer", "list-solution", "null-solution", "named-field", "1e400", "nan", "-inf",
        "decimal", "bool", "object", "long-number"])
def test_a_field_of_the_wrong_type_is_one_line(tmp_path, line, opts, expected):
    first = {"prompt": "a", "answer": "1", "q": "a", "sol": "s"}
    path = _write(tmp_path / "d.jsonl", [first, line])
    with pytest.raises(ConfigError) as e:
        _task(path=path, **opts)
    assert str(e.value) == f"task.path: {path}:2: {expected}"


def test_a_benchmark_field_of_the_wrong_type_names_its_file(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": "1"} for i in range(4)])
    bench = _write(tmp_path / "b.jsonl", [{"prompt": "x", "answer": "1"}, {"prompt": ["x"], "answer": "1"}])
    with pytest.raises(ConfigError) as e:
        _task(path=path, test_fraction=0.0, benchmarks={"b": bench})
    assert str(e.value) == f'task.benchmarks.b: {bench}:2: "prompt" must be a string, got ["x"]'


def test_an_integer_answer_is_kept_as_written_however_long(tmp_path):
    # Python's int() refuses more than 4,300 digits: the number is never converted
    path = _write(tmp_path / "d.jsonl", ['{"prompt": "a", "answer": ' + DIGITS + "}",
                                         '{"prompt": "b", "answer": -12, "id": ' + DIGITS + "}"])
    task = _task(path=path, val_fraction=0.0, test_fraction=0.0)
    got = {e.prompt: e.answer for e in task.examples("train")}
    assert got == {"a": DIGITS, "b": "-12"}
    a = next(e for e in task.examples("train") if e.prompt == "a")
    assert task.verify(f"\\boxed{{{DIGITS}}}", a) and not task.verify(f"\\boxed{{{DIGITS[:-1]}}}", a)


def _by_prompt_split(n_prompts: int, val: float, test: float, seed: int) -> dict[str, set[int]]:
    """The split of prompt ids 0..n_prompts-1 (in order of first appearance) the docstring promises."""
    order = list(range(n_prompts))
    random.Random(seed).shuffle(order)
    n_test, n_val = round(test * n_prompts), round(val * n_prompts)
    return {"test": set(order[:n_test]), "val": set(order[n_test:n_test + n_val]), "train": set(order[n_test + n_val:])}


def test_a_prompt_on_several_lines_stays_in_one_split(tmp_path):
    # 100 distinct prompts on 300 lines, in random order: a split by line put most test prompts into train
    ids = [i % 100 for i in range(300)]
    random.Random(5).shuffle(ids)
    rows = [{"prompt": f"question {i}", "answer": str(i), "solution": f"way {k}"} for k, i in enumerate(ids)]
    path = _write(tmp_path / "d.jsonl", rows)
    task = _task(path=path, solution_field="solution", seed=2)
    got = {s: [(e.prompt, e.solution) for e in task.examples(s)] for s in ("train", "val", "test")}
    prompts = {s: {p for p, _ in xs} for s, xs in got.items()}
    assert not prompts["test"] & prompts["train"] and not prompts["val"] & prompts["train"]
    assert not prompts["val"] & prompts["test"]
    assert sorted(x for xs in got.values() for x in xs) == sorted((r["prompt"], r["solution"]) for r in rows)
    first_seen = list(dict.fromkeys(ids))  # prompt ids in order of first appearance
    want = _by_prompt_split(100, 0.1, 0.1, 2)
    for s in ("train", "val", "test"):
        assert prompts[s] == {f"question {first_seen[j]}" for j in want[s]}
        assert len(got[s]) == 3 * len(want[s])  # every line of a prompt goes with it
    assert task.summary() == "300 lines, 100 distinct prompts: 80 train / 10 val / 10 test prompts"


def test_distinct_prompts_split_as_lines_did(tmp_path):
    # a file without repeated prompts keeps the split it had when lines were shuffled one by one
    path = _write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": "1"} for i in range(37)])
    task = _task(path=path, val_fraction=0.15, test_fraction=0.2, seed=9)
    want = _by_prompt_split(37, 0.15, 0.2, 9)
    order = list(range(37))
    random.Random(9).shuffle(order)
    for s in ("train", "val", "test"):
        assert [e.prompt for e in task.examples(s)] == [f"p{i}" for i in order if i in want[s]]
    assert task.summary() == "37 lines, 37 distinct prompts: 24 train / 6 val / 7 test prompts"


def test_the_summary_names_prompts_a_split_field_or_a_benchmark_shares_with_train(tmp_path):
    rows = [{"prompt": p, "answer": "1", "part": part} for p, part in
            [("a", "train"), ("b", "train"), ("a", "test"), ("c", "val"), ("b", "val"), ("d", "test"), ("a", "train")]]
    task = _task(path=_write(tmp_path / "d.jsonl", rows), split_field="part")
    assert task.summary() == ("7 lines, 4 distinct prompts: 2 train / 2 val / 2 test prompts; "
                              "prompts also in train: 1 val, 1 test")
    main = _write(tmp_path / "m.jsonl", [{"prompt": f"p{i}", "answer": "1"} for i in range(10)])
    b2 = _write(tmp_path / "b2.jsonl", [{"prompt": "x", "answer": "2"}])
    task = _task(path=main, val_fraction=0.2, test_fraction=0.0, benchmarks={"two": b2})
    assert task.summary() == ("10 lines, 10 distinct prompts: 8 train / 2 val prompts; test: 1 line, 1 distinct "
                              "prompt from 1 benchmark file")
    seen = task.examples("train")[0].prompt  # a benchmark problem that the train split holds too
    b1 = _write(tmp_path / "b1.jsonl", [{"prompt": seen, "answer": "1"}, {"prompt": "x", "answer": "2"}])
    task = _task(path=main, val_fraction=0.2, test_fraction=0.0, benchmarks={"one": b1, "two": b2})
    assert task.summary() == ("10 lines, 10 distinct prompts: 8 train / 2 val prompts; test: 3 lines, 2 distinct "
                              "prompts from 2 benchmark files; prompts also in train: 1 test")


@pytest.mark.parametrize("n,val,test", [(50, 0.1, 0.2), (7, 0.3, 0.3), (40, 0.0, 0.25)])
def test_seeded_fractions_are_disjoint_and_cover_everything(tmp_path, n, val, test):
    rows = [{"prompt": f"p{i}", "answer": str(i)} for i in range(n)]
    path = _write(tmp_path / "d.jsonl", rows)
    a = _split_prompts(_task(path=path, val_fraction=val, test_fraction=test, seed=3))
    b = _split_prompts(_task(path=path, val_fraction=val, test_fraction=test, seed=3))
    assert a == b
    assert len(a["test"]) == round(test * n) and len(a["val"]) == round(val * n)
    allp = a["train"] + a["val"] + a["test"]
    assert sorted(allp) == sorted(r["prompt"] for r in rows)  # covers, no duplicates
    assert len(set(allp)) == n


def test_different_seed_gives_a_different_split(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": "0"} for i in range(60)])
    a = _split_prompts(_task(path=path, seed=0, val_fraction=0.2, test_fraction=0.2))
    b = _split_prompts(_task(path=path, seed=1, val_fraction=0.2, test_fraction=0.2))
    assert set(a["test"]) != set(b["test"])


def test_split_field(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": "1", "part": ["train", "val", "test"][i % 3]} for i in range(9)]
    path = _write(tmp_path / "d.jsonl", rows)
    task = _task(path=path, split_field="part")
    for s in ("train", "val", "test"):
        assert [e.prompt for e in task.examples(s)] == [r["prompt"] for r in rows if r["part"] == s]


def test_bad_split_value_names_line(tmp_path):
    rows = [{"prompt": "a", "answer": "1", "part": "train"}, {"prompt": "b", "answer": "1", "part": "dev"}]
    path = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(ConfigError) as e:
        _task(path=path, split_field="part")
    assert f"{path}:2:" in str(e.value) and "'dev'" in str(e.value)


def test_malformed_line_names_file_and_line(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, "", "{not json", {"prompt": "b", "answer": "2"}]
    path = _write(tmp_path / "bad.jsonl", rows)  # line 2 is blank: line numbers are the file's
    with pytest.raises(ConfigError) as e:
        _task(path=path)
    msg = str(e.value)
    assert f"{path}:3:" in msg
    assert msg.startswith("task.path:")


def test_non_object_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, "[1, 2]"])
    with pytest.raises(ConfigError, match=r":2: expected a JSON object"):
        _task(path=path)


def test_missing_field_is_named(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "ans": "2"}])
    with pytest.raises(ConfigError) as e:
        _task(path=path)
    assert f"{path}:2:" in str(e.value) and "'answer'" in str(e.value)
    path2 = _write(tmp_path / "e.jsonl", [{"prompt": "a", "answer": "1"}])
    with pytest.raises(ConfigError, match="'sol'"):
        _task(path=path2, solution_field="sol")


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^task\.path:"):
        _task(path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match=r"^task\.path:"):
        _task()
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ConfigError, match="no examples"):
        _task(path=empty)


@pytest.mark.parametrize("opts,key", [
    ({"val_fraction": 1.0}, "val_fraction"), ({"test_fraction": -0.1}, "test_fraction"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
])
def test_bad_fractions(tmp_path, opts, key):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}])
    with pytest.raises(ConfigError) as e:
        _task(path=path, **opts)
    assert str(e.value).startswith(f"task.{key}:")


@pytest.fixture
def task(tmp_path):
    return _task(path=_write(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}]))


@pytest.mark.parametrize("response,answer", [
    ("so \\boxed{\\frac{1}{2}}", "1/2"),
    ("\\boxed{1/2}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\tfrac{3}{4}}", "0.75"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{2/4}", "1/2"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{1000}", "1,000"),
    ("\\boxed{1,234,567.5}", "1234567.5"),
    ("\\boxed{ 42 }", "42"),
    ("\\boxed{42.}", "42"),
    ("\\boxed{$7$}", "7"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{\\text{5}}", "5"),
    ("\\boxed{\\left(1,2\\right)}", "(1, 2)"),
    ("\\boxed{-3}", "-3"),
    ("\\boxed{\\frac{-1}{2}}", "-1/2"),
    ("\\boxed{3.0}", "3"),
    ("\\fbox{12}", "12"),
    ("\\boxed{-\\frac{1}{2}}", "-1/2"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5"),
    ("\\boxed{\\frac12}", "1/2"),
    ("\\boxed{1{,}000}", "1000"),
    ("\\boxed{+3}", "3"),
    ("first \\boxed{1} then \\boxed{x^{2}+1}", "x^{2}+1"),
])
def test_verifier_accepts_equivalent_forms(task, response, answer):
    assert task.verify(response, Example(prompt="", answer=answer))


@pytest.mark.parametrize("response,answer", [
    ("\\boxed{\\frac{1}{3}}", "1/2"),
    ("\\boxed{1/2}", "2"),
    ("\\boxed{1,00}", "100"),
    ("\\boxed{100}", "1000"),
    ("\\boxed{-3}", "3"),
    ("\\boxed{0.5}", "0.55"),
    ("1/2", "1/2"),  # no \boxed
    ("\\boxed{1/2", "1/2"),  # unclosed
    ("\\boxed{1/2} then \\boxed{3}", "1/2"),  # only the last box counts
    ("\\boxed{\\frac{1}{0}}", "1"),
    ("\\boxed{x+1}", "x+2"),
    ("\\boxed{-\\frac{1}{2}}", "1/2"),
    ("\\boxed{\\frac13}", "1/2"),
])
def test_verifier_rejects_wrong_answers(task, response, answer):
    assert not task.verify(response, Example(prompt="", answer=answer))
