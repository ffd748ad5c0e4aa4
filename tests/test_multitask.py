"""Several tasks, one teacher each (config ``tasks``): config errors name their key, the batch
order follows the schedule, each batch is sampled with its task's sampler and scored by its task's
teacher (and no other), evaluation reports every task and their mean, and a tiny run of
arithmetic + a text game plays, trains and writes one table per task."""

from __future__ import annotations

import pytest
import torch
from conftest import DEFAULT_CONF, TINY, compose

from opdlm.builder import build_run
from opdlm.data import ScheduledBatches, TaskData, TaskSchedule
from opdlm.errors import ConfigError
from opdlm.evaluation import evaluate, evaluate_task, merged_metrics
from opdlm.module import OPDModule

SMALL = [o for o in TINY if not o.startswith("task.")]
TWO = [  # two arithmetic tasks that differ in operators and budgets, each with its own teacher
    "tasks=[{name: arithmetic, label: add, ops: '+', n_train: 120, n_val: 4, n_test: 6, teacher: {layers: 1}, "
    "sampler: {max_new_tokens: 10}}, {name: arithmetic, label: sub, ops: '-', n_train: 120, n_val: 4, n_test: 6, "
    "weight: 2, teacher: {layers: 2}, sampler: {max_new_tokens: 14}, teacher_sft: {steps: 5, lr: 0.01}}]",
]


def two_cfg(*extra: str) -> dict:
    return compose([str(DEFAULT_CONF)], [*SMALL, *TWO, *extra])


def test_tasks_are_completed_with_their_teacher_and_sampler():
    cfg = two_cfg()
    add, sub = cfg["tasks"]
    assert (add["label"], sub["label"], add["weight"], sub["weight"]) == ("add", "sub", 1.0, 2)
    assert add["teacher"]["layers"] == 1 and sub["teacher"]["layers"] == 2
    assert add["teacher"]["hidden_size"] == cfg["teacher"]["hidden_size"]  # merged onto `teacher`
    assert add["sampler"]["max_new_tokens"] == 10 and sub["sampler"]["top_p"] == cfg["sampler"]["top_p"]
    built = build_run(cfg)
    assert list(built.tasks) == ["add", "sub"]
    assert built.tasks["add"].sampler.max_new_tokens == 10 and built.tasks["sub"].sampler.max_new_tokens == 14
    assert built.several and [t.key for t in built.tasks.values()] == ["tasks.0.", "tasks.1."]
    sft = {label: run.cfg["stages"]["teacher_sft"] for label, run in built.tasks.items()}  # each teacher's own SFT
    assert (sft["add"]["steps"], sft["sub"]["steps"], sft["sub"]["lr"]) == (3, 5, 0.01)
    assert sft["sub"]["batch_size"] == sft["add"]["batch_size"] == cfg["stages"]["teacher_sft"]["batch_size"]
    assert {k: len(v) for k, v in built.sets("train").items()} == {"add": 120, "sub": 120}
    assert len(built.examples("train")) == 240  # the student's cold start reads them all
    with pytest.raises(AttributeError, match="this run has 2 tasks"):
        built.sampler  # noqa: B018  (the parts of one task: only for a run of one task)


@pytest.mark.parametrize("extra,message", [
    (["tasks.1.teacher=null"], r"tasks.1.teacher: task 'sub' has no teacher; every task of a multi-task run needs its "
                               r"own \(a model node, or a model folder's path\)$"),
    (["tasks.1.label=add"], r"tasks.1.label: two tasks are named 'add' \(tasks.0 and tasks.1\)"),
    (["tasks.0.weight=0"], r"tasks.0.weight: must be a finite number > 0, got 0$"),
    (["tasks.0.weight=.inf"], r"tasks.0.weight: must be a finite number > 0, got inf$"),
    (["tasks.1.teacher_sft.steps=-1"], r"^command line: tasks.1.teacher_sft.steps: must be >= 0, got -1$"),
    (["tasks.0.weight=1.5"], r"tasks.0.weight: task_schedule alternate gives each task `weight` consecutive batches: "
                             r"a whole number, got 1.5$"),
    (["stages.opd.task_schedule=random"], r"stages.opd.task_schedule: must be alternate or mixed, got 'random'$"),
    (["tasks.0.ops=/"], r"tasks.0.ops: must be a non-empty subset of"),
    (["task.name=arithmetic"], r"task.name: a multi-task run \(tasks: \[...\]\) does not read task"),
    (["tasks.1.teacher.layers=zero"], r"tasks.1.teacher.layers: expected integer, got 'zero'"),
    (["tasks.1.teacher_sft.stepz=3"], r"tasks.1.teacher_sft.stepz: unknown key \(did you mean 'steps'\?\)"),
    (["tasks.0.n_train=6"],
     r"^tasks.0.teacher_sft.batch_size: a batch of 8 is larger than the task's 6 training examples$"),
])
def test_bad_task_lists_fail_in_one_line_naming_the_key(extra, message):
    with pytest.raises(ConfigError, match=message) as e:
        build_run(two_cfg(*extra))
    assert "\n" not in str(e.value)


def test_the_alternate_schedule_gives_each_task_its_weight_in_turn():
    sched = TaskSchedule(["add", "sub"], [1, 2], "alternate", seed=0)
    assert [sched(s) for s in range(7)] == ["add", "sub", "sub", "add", "sub", "sub", "add"]


def test_the_mixed_schedule_draws_tasks_in_proportion_to_their_weight():
    a, b = TaskSchedule(["x", "y"], [3.0, 1.0], "mixed", seed=5), TaskSchedule(["x", "y"], [3.0, 1.0], "mixed", seed=5)
    seq = [a(s) for s in range(4000)]
    assert seq == [b(s) for s in reversed(range(4000))][::-1]  # the same draws whatever the order of asking
    share = seq.count("x") / len(seq)
    assert abs(share - 0.75) < 0.03  # binomial sd 0.007
    assert seq != [TaskSchedule(["x", "y"], [3.0, 1.0], "mixed", seed=6)(s) for s in range(4000)]


def test_batches_follow_the_schedule_and_each_task_its_own_stream():
    built = build_run(two_cfg())
    items = built.sets("train")
    sched = TaskSchedule(["add", "sub"], [1, 2], "alternate", seed=0)

    def batches(**kw):  # (label, examples) per batch
        return [(b.label, b.examples) for b in ScheduledBatches(items, sched, batch_size=4, steps=12, seed=3, **kw)]

    one = batches(rank=0, world=1)
    for s, (label, batch) in enumerate(one):
        assert label == sched(s) and all(ex in items[label] for ex in batch)
    seen = [ex.prompt for label, b in one if label == "add" for ex in b]
    assert len(seen) == len(set(seen))  # within one pass over the task's items, nothing twice
    # two processes: the ranks' halves, concatenated, are the one-process batch
    ranks = [batches(rank=r, world=2) for r in range(2)]
    assert [(a[0], a[1] + b[1]) for a, b in zip(*ranks)] == one
    # resumed at step 5 (after a kill): the same batches from there on
    assert batches(rank=0, world=1, start=lambda: 5) == one[5:]


def test_a_run_of_one_task_takes_the_batches_of_its_own_stream():
    """The first (or only) task's stream is seeded with the run's seed: a run of one task draws the
    batches a plain shuffled stream (opdlm.data.StepBatches) gives."""
    from opdlm.data import StepBatches
    built = build_run(compose([str(DEFAULT_CONF)], [*TINY]))
    items = built.sets("train")
    (label,) = items
    sched = TaskSchedule([label], [1.0], "alternate", seed=0)
    got = [b.examples for b in ScheduledBatches(items, sched, batch_size=4, steps=9, seed=3, rank=0, world=1)]
    assert got == list(StepBatches(items[label], batch_size=4, steps=9, seed=3, rank=0, world=1, collate=list))


def test_each_batch_is_sampled_and_scored_with_its_own_tasks_sampler_and_teacher():
    cfg = two_cfg("stages.opd.prompts_per_step=2", "sampler.n=2")
    built = build_run(cfg)
    torch.manual_seed(0)
    module = OPDModule(cfg, built=built)
    assert module.teachers["add"] is not module.teachers["sub"]
    assert len(module.teachers["add"].model.layers) == 1 and len(module.teachers["sub"].model.layers) == 2
    calls = {"add": 0, "sub": 0}
    for label, t in module.teachers.items():
        t.model.register_forward_hook(lambda *_a, label=label: calls.__setitem__(label, calls[label] + 1))  # its body
    opt = torch.optim.AdamW(module.student.parameters(), lr=1e-3)
    data = TaskData(built.sets("train"), mode="opd", batch_size=2, steps=3, seed=0, schedule=TaskSchedule(
        ["add", "sub"], [1, 2], "alternate", seed=0))
    for batch in data.train_dataloader():
        task = built.tasks[batch.label]
        before = dict(calls)
        rollout = module.sample(batch.examples, task)
        assert rollout.response_mask.shape[1] <= task.sampler.max_new_tokens
        view, teacher, support, mask = module.prepare(rollout, task)
        module.update(rollout, view, teacher, support, mask, optimizer=opt, task=task)
        assert calls[batch.label] == before[batch.label] + 1 and sum(calls.values()) == sum(before.values()) + 1
    assert calls == {"add": 1, "sub": 2}


def test_evaluation_reports_every_task_and_their_mean():
    cfg = two_cfg()
    built = build_run(cfg)
    module = OPDModule(cfg, built=built)
    m = evaluate(module.student, built.student.tokenizer, built, cfg, False, "test")
    per = {label: evaluate_task(module.student, built.student.tokenizer, run, cfg, False, "test")
           for label, run in built.tasks.items()}
    assert evaluate(module.student, built.student.tokenizer, built, cfg, False, "test", task="sub") == per["sub"]
    for label in ("add", "sub"):
        assert m[f"test/{label}/acc_greedy"] == per[label]["test/acc_greedy"]
    assert m["test/acc_greedy"] == pytest.approx((per["add"]["test/acc_greedy"] + per["sub"]["test/acc_greedy"]) / 2)
    assert merged_metrics({"a": {"test/x": 1.0}, "b": {"test/x": 0.0, "test/y": 4.0}}, "test") == {
        "test/a/x": 1.0, "test/b/x": 0.0, "test/b/y": 4.0, "test/x": 0.5, "test/y": 4.0}


@pytest.mark.slow
def test_a_tiny_run_of_arithmetic_and_a_text_game(tmp_path):
    pytest.importorskip("textworld")
    from opdlm.pipeline import Runner
    game = ("{name: text_game, label: game, env: {name: textworld, game_type: coin_collector, level: 3, n_train: 8, "
            f"n_val: 1, n_test: 2, cache_dir: '{tmp_path / 'games'}'}}, teacher: {{max_positions: 1024}}, "
            "sampler: {name: multi_turn, max_new_tokens: 8, n: 2, max_turns: 4, max_context: 900}}")
    math = ("{name: arithmetic, label: math, n_train: 100, n_val: 2, n_test: 4, teacher: {layers: 1}, "
            "sampler: {max_new_tokens: 12}}")
    cfg = compose([str(DEFAULT_CONF)], [*SMALL, f"tasks=[{math}, {game}]", "student.max_positions=1024",
                                        "maskers=[]", f"run.out_dir={tmp_path}", "stages.opd.steps=2",
                                        "trainer.log_every_n_steps=1", "eval.test_prompts=2"])
    res = Runner(cfg).run()
    for key in ("teacher", "student_before", "student_after"):
        assert {"test/math/acc_greedy", "test/game/acc_greedy", "test/game/turns_greedy"} <= set(res[key]["test"])
    run_dir = tmp_path / "demo"
    assert (run_dir / "teacher_math" / "stage.json").is_file() and (run_dir / "teacher_game" / "stage.json").is_file()
    table = (run_dir / "results.md").read_text()
    assert "task math (arithmetic):" in table and "task game (text_game):" in table and "| teachers (each on its task) |" in table
    header = (run_dir / "logs" / "opd" / "metrics.csv").read_text().splitlines()[0]
    assert "train/math/loss" in header and "train/game/loss" in header
