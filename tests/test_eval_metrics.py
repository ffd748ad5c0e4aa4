"""Evaluation the way papers report it: pass@k and maj@k against brute force, the sampled
evaluation's per-prompt numbers against a re-run of the same seeded sampler, named benchmarks
averaged, and the jsonl task's math-verify verifier with its unparsed count."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter

import pytest
import torch
from conftest import TINY, demo_cfg

from opdlm.builder import build_run
from opdlm.dist import step_seed
from opdlm.errors import ConfigError
from opdlm.evaluation import SPLIT_SEED, evaluate, generate_batch
from opdlm.metrics import majority_correct, pass_at_k
from opdlm.models import render_prompt
from opdlm.registry import TASKS
from opdlm.results import results_table


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_is_the_mean_over_all_k_subsets(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_vote_against_a_plain_count():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 7)
        answers = [rng.choice(["1", "2", "3", None]) for _ in range(n)]
        truth = rng.choice(["1", "2"])
        correct = [a == truth for a in answers]
        k = rng.randint(1, n)
        votes = [a for a in answers[:k] if a is not None]
        if not votes:
            want = False
        else:
            top = max(Counter(votes).values())
            first = [a for a in votes if Counter(votes)[a] == top][0]  # ties: the answer seen first
            want = first == truth
        assert majority_correct(answers, correct, k) == want
    assert majority_correct(["2", "1", "1", "2"], [False, True, True, False], 4) is False  # tie: "2" came first
    assert majority_correct(["2", "1", "1"], [False, True, True], 3) is True


def test_sampled_evaluation_matches_a_rerun_of_the_seeded_sampler():
    cfg = demo_cfg(*TINY, "eval.samples.test=4", "eval.pass_k.test=[1,2,4]", "sampler.max_new_tokens=12")
    built = build_run(cfg)
    torch.manual_seed(0)
    model = built.student.build(0)
    tok = built.student.tokenizer
    batch = built.task.examples("test")[:4]
    seed = step_seed(0, SPLIT_SEED["test"], 0)
    got = generate_batch(model, tok, built, False, batch, ["greedy", "sampled"], seed, 4, [1, 2, 4])
    # the reference: the same seeded draw, scored by hand
    torch.manual_seed(step_seed(seed, 1))
    ro = built.sampler.sample(model, tok, [render_prompt(tok, ex.prompt, False) for ex in batch], batch, n=4)
    for p, ex in enumerate(batch):
        texts = ro.texts[4 * p: 4 * p + 4]
        ok = [built.task.verify(t, ex) for t in texts]
        answers = [built.task.extract(t) for t in texts]
        assert got["acc_sampled"][p] == pytest.approx(sum(ok) / 4)
        assert got["pass@1"][p] == pytest.approx(sum(ok) / 4)
        assert got["pass@4"][p] == float(any(ok))
        assert got["unparsed_sampled"][p] == pytest.approx(sum(a is None for a in answers) / 4)
        assert got["maj@1"][p] == float(ok[0] if answers[0] is not None else False)
    assert set(got) >= {"acc_greedy", "len_greedy", "trunc_greedy", "unparsed_greedy", "maj@2", "maj@4"}


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_math_verify_verifier_equivalences_and_unparsed(tmp_path):
    data = tmp_path / "d.jsonl"
    _write(data, [{"prompt": f"q{i}", "answer": "1"} for i in range(10)])
    task = TASKS.build({"name": "jsonl", "path": str(data), "verifier": "math_verify"})
    ex = task.examples("train")[0]
    from opdlm.types import Example
    half, two = Example(prompt="", answer="\\frac{1}{2}"), Example(prompt="", answer="2")
    assert task.verify("so the answer is \\boxed{0.5}", half)
    assert task.verify("\\boxed{\\sqrt{4}}", two)
    assert not task.verify("\\boxed{3}", two)
    assert not task.verify("\\boxed{\\frac{", two) and task.extract("\\boxed{\\frac{") is None  # unparsable: wrong
    assert task.extract("\\boxed{\\sqrt{4}}") is not None and ex.answer == "1"
    boxed = TASKS.build({"name": "jsonl", "path": str(data)})  # the built-in verifier is stricter
    assert not boxed.verify("\\boxed{\\sqrt{4}}", two) and boxed.verify("\\boxed{2}", two)


def test_math_verify_missing_is_one_line(tmp_path, monkeypatch):
    import sys
    data = tmp_path / "d.jsonl"
    _write(data, [{"prompt": "q", "answer": "1"}] * 10)
    monkeypatch.setitem(sys.modules, "math_verify", None)  # an import of it now fails
    with pytest.raises(ConfigError, match=r'^task\.verifier: math_verify needs the math-verify package: pip install "opdlm\[math\]"$'):
        TASKS.build({"name": "jsonl", "path": str(data), "verifier": "math_verify"}, "task")


def test_benchmarks_are_reported_each_and_averaged(tmp_path):
    train = tmp_path / "train.jsonl"
    _write(train, [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(30)])
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(a, [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(3)])
    _write(b, [{"prompt": f"{i}+3=", "answer": str(i + 3)} for i in range(5)])
    bench = f"{{alpha: {a}, beta: {b}}}"
    cfg = demo_cfg(*TINY, "task.name=jsonl", f"task.path={train}", "task.test_fraction=0", f"task.benchmarks={bench}",
                   "task.template=math", "eval.test_prompts=0", "eval.sampled=false", "sampler.max_new_tokens=8",
                   "stages.teacher_sft.steps=0", "stages.student_sft.steps=0")
    built = build_run(cfg)
    test = built.task.examples("test")
    assert [ex.meta["benchmark"] for ex in test] == ["alpha"] * 3 + ["beta"] * 5
    assert test[0].prompt.startswith("0+2=\n\nPlease reason step by step") and test[0].prompt.endswith("\\boxed{}.")
    torch.manual_seed(0)
    out = evaluate(built.student.build(0), built.student.tokenizer, built, cfg, False, "test")
    for m in ("acc_greedy", "len_greedy", "unparsed_greedy"):
        assert out[f"test/{m}"] == pytest.approx((out[f"test/alpha/{m}"] + out[f"test/beta/{m}"]) / 2)
    assert out["test/alpha/len_greedy"] > 0
    # the results table gets a per-benchmark block
    res = {k: {"test": out} for k in ("teacher", "student_before", "student_after")}
    table = results_table({**res, "seed": 0, "seconds": 1.0}, cfg)
    assert "| model | alpha | beta | mean |" in table and "unparsed" in table


@pytest.mark.parametrize("override,msg", [
    ("task.test_fraction=0.1", r"^task\.test_fraction: with benchmarks the test split comes from the benchmark files"),
    ("task.template=oops", r"^task\.template: must contain \{prompt\} or name a preset \(math\)"),
    ("task.verifier=sympy", r"^task\.verifier: must be one of boxed, math_verify, got 'sympy'"),
])
def test_jsonl_option_errors(tmp_path, override, msg):
    train, a = tmp_path / "t.jsonl", tmp_path / "a.jsonl"
    _write(train, [{"prompt": "p", "answer": "1"}] * 10)
    _write(a, [{"prompt": "p", "answer": "1"}])
    node = {"name": "jsonl", "path": str(train), "test_fraction": 0.0, "benchmarks": {"a": str(a)}}
    key, value = override.split("=")
    node[key.split(".")[1]] = float(value) if key.endswith("fraction") else value
    with pytest.raises(ConfigError, match=msg):
        TASKS.build(node, "task")


def test_a_malformed_benchmark_line_is_named(tmp_path):
    train, a = tmp_path / "t.jsonl", tmp_path / "a.jsonl"
    _write(train, [{"prompt": "p", "answer": "1"}] * 10)
    a.write_text('{"prompt": "p", "answer": "1"}\n{"prompt": "p"\n')
    with pytest.raises(ConfigError, match=rf"^task\.benchmarks\.x: {a}:2: not valid JSON"):
        TASKS.build({"name": "jsonl", "path": str(train), "test_fraction": 0.0, "benchmarks": {"x": str(a)}}, "task")
