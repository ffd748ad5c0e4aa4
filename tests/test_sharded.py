"""A student sharded with FSDP2 (trainer.strategy=model_parallel, opdlm.shard) on 2 gloo processes
trains exactly as one process does on both ranks' data: one OPD step (top_p rollouts, generated
from the shards) and one SFT step, each compared with the same step on one process; and the pieces
that make it so (the gathered copy, the lean head's fallback, the strategy opdlm builds, the
refusals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, demo_cfg
from torch.nn.functional import pad

from opdlm.builder import build_run
from opdlm.errors import ConfigError
from opdlm.module import OPDModule
from opdlm.ops.batch import concat_rollouts
from opdlm.ops.head import split_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from fsdp2_worker import CASES, run_worker  # noqa: E402
from test_resume import env, student  # noqa: E402

REL_TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ts])


def opd_reference(name: str, ranks: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One OPD step on one process on the ranks' rollouts concatenated: (gradient, start, after)."""
    cfg = demo_cfg(*TINY, *CASES[name], "trainer.accelerator=cpu")
    built = build_run(cfg)
    module = OPDModule(cfg, built=built, student=built.student.build(0), teacher=built.teacher.build(1))
    rollout = concat_rollouts([r[name]["seen"] for r in ranks], built.student.tokenizer.pad_token_id)
    opt_cfg = module.configure_optimizers()
    grads: list[list[torch.Tensor]] = []
    opt_cfg["optimizer"].register_step_pre_hook(
        lambda *_: grads.append([p.grad.detach().clone() for p in module.student.parameters()]))
    start = [p.detach().clone() for p in module.student.parameters()]
    view, teacher, support, mask = module.prepare(rollout)
    module.update(rollout, view, teacher, support, mask, optimizer=opt_cfg["optimizer"],
                  scheduler=opt_cfg["lr_scheduler"]["scheduler"])
    return grads[0], start, [p.detach().clone() for p in module.student.parameters()]


def same_rollouts_as_one_process(ranks: list[dict], name: str, atol: float) -> None:
    """Each rank's rollout of case ``name`` equals, token for token, what the case's sampler gives on
    one process with the unsharded starting weights, that rank's prompts and its random state."""
    from opdlm.models import render_prompt
    built = build_run(demo_cfg(*TINY, *CASES[name], "trainer.accelerator=cpu"))
    student, tok = built.student.build(0), built.student.tokenizer
    for r in ranks:
        ro = r[name]["seen"]
        torch.random.set_rng_state(r[name]["rng"])
        examples = ro.examples[:: built.sampler.n]
        one = built.sampler.sample(student, tok, [render_prompt(tok, e.prompt, built.student.node["chat_template"])
                                                  for e in examples], examples)
        assert torch.equal(one.input_ids, ro.input_ids)
        assert torch.allclose(one.behaviour_logprobs, ro.behaviour_logprobs, atol=atol)


def check_step(ranks: list[dict], name: str, grad: list[torch.Tensor], start: list[torch.Tensor],
               after: list[torch.Tensor]) -> None:
    for r in ranks:
        got = r[name]
        assert got["world"] == 2 and got["sharded"]
        # FSDP2's class for the sharded model; the lean head's split refused (the head is gathered in forward only)
        assert (got["class"], got["plain"], got["split"]) == ("FSDPQwen2ForCausalLM", "Qwen2ForCausalLM", False)
        assert got["local"] < got["total"]  # each rank held a part of every parameter, not all of it
        assert len(got["grads"]) == 1
        assert rel(flat(got["grads"][0]), flat(grad)) <= REL_TOL, rel(flat(got["grads"][0]), flat(grad))
        moved = flat(got["params"]) - flat(start)
        assert rel(moved, flat(after) - flat(start)) <= REL_TOL, rel(moved, flat(after) - flat(start))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_worker(tmp_path_factory.mktemp("fsdp2"), "opd_top_p", "sft")


@pytest.mark.slow
def test_opd_step_with_a_sharded_student_equals_one_process_on_the_concatenated_rollouts(two_ranks):
    rollouts = [r["opd_top_p"]["seen"] for r in two_ranks]
    assert not {e.prompt for e in rollouts[0].examples} & {e.prompt for e in rollouts[1].examples}
    check_step(two_ranks, "opd_top_p", *opd_reference("opd_top_p", two_ranks))


@pytest.mark.slow
def test_sharded_rollouts_are_the_plain_models_on_the_same_seeds(two_ranks):
    """Generation from the shards (every forward gathers them; the ranks keep stepping together
    until both are done) gives the tokens the whole model gives from the same random state."""
    same_rollouts_as_one_process(two_ranks, "opd_top_p", atol=1e-5)
    # one rank's responses ended before the other's: it kept running forwards for the other's gathers
    longest = [int(r["opd_top_p"]["seen"].lengths.max()) for r in two_ranks]
    assert longest[0] != longest[1], longest


@pytest.mark.slow
def test_sft_step_with_a_sharded_model_is_the_token_mean_over_both_ranks(two_ranks):
    batches = [r["sft"]["seen"] for r in two_ranks]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert counts[0] != counts[1], counts
    cfg = demo_cfg(*TINY, *CASES["sft"], "trainer.accelerator=cpu")
    built = build_run(cfg)
    from opdlm.sft import SFTModule
    module = SFTModule(cfg, "student", built=built, model=built.student.build(0))
    L = max(b["input_ids"].shape[1] for b in batches)
    pad_id = built.student.tokenizer.pad_token_id
    cat = {k: torch.cat([pad(b[k], (0, L - b[k].shape[1]), value=v) for b in batches])
           for k, v in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100))}
    opt_cfg = module.configure_optimizers()
    start = [p.detach().clone() for p in module.model.parameters()]
    module.model(**cat, use_cache=False).loss.backward()
    grad = [p.grad.detach().clone() for p in module.model.parameters()]
    opt_cfg["optimizer"].step()
    check_step(two_ranks, "sft", grad, start, [p.detach().clone() for p in module.model.parameters()])


@pytest.mark.slow
def test_validation_of_a_sharded_student_equals_one_process_on_its_gathered_weights(two_ranks, tmp_path):
    """The validation after the step ran on a copy gathered on every rank, the ranks evaluating
    batches of 3 and 1 prompts: its logged numbers are one process's on the trained weights."""
    import csv

    from opdlm.evaluation import evaluate
    out = two_ranks[0]["opd_top_p"]["out"]
    with open(Path(out) / "logs" / "opd" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/acc_greedy")]
    assert len(rows) == 1
    cfg = demo_cfg(*TINY, *CASES["opd_top_p"], "trainer.accelerator=cpu")
    built = build_run(cfg)
    model = built.student.build(0)
    with torch.no_grad():
        for p, v in zip(model.parameters(), two_ranks[0]["opd_top_p"]["params"]):
            p.copy_(v)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (as the ranks ran)
    try:
        want = evaluate(model, built.student.tokenizer, built, cfg, built.student.node["chat_template"], "val")
    finally:
        torch.set_num_threads(threads)
    logged = {k: float(v) for k, v in rows[0].items() if k.startswith("val/") and v != ""}
    assert logged.keys() == want.keys()
    for k, v in want.items():
        assert logged[k] == pytest.approx(v, abs=1e-6), k


def cli(out: Path, strategy: str = "model_parallel", steps: int = 30) -> list[str]:
    over = [o for o in TINY if not o.startswith(("run.checkpoints", "eval.test_prompts"))]
    return [sys.executable, "-u", str(ROOT / "run.py"), *over, f"run.out_dir={out}", f"stages.opd.steps={steps}",
            "run.checkpoint_every=3", "trainer.devices=2", f"trainer.strategy={strategy}", "trainer.threads=1",
            "stages.opd.prompts_per_step=4", "eval.test_prompts=8"]


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    """The whole pipeline on 2 processes with FSDP2 students: killed (SIGKILL, both processes) after
    an OPD checkpoint, the same command continues from it (a full checkpoint, written by rank 0, loaded
    into the shards with the optimizer's state) and exports the student of an uninterrupted run."""
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(killed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                            cwd=ROOT, start_new_session=True)
    try:
        for line in proc.stdout:
            if "[opdlm] stage opd:" in line:
                break
        ckpt = killed / "demo" / "checkpoints" / "opd" / "last.ckpt"
        deadline = time.time() + 300
        while not ckpt.is_file() and time.time() < deadline:
            time.sleep(0.05)
        assert ckpt.is_file()
        time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (killed / "demo" / "student").exists()
    again = subprocess.run(cli(killed), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    line = next(x for x in again.stdout.splitlines() if "stage opd: resuming from" in x)
    assert 0 < int(line.rsplit("optimizer step ", 1)[1].rstrip(")")) < 30, line
    whole = tmp_path / "whole"
    ref = subprocess.run(cli(whole), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "on 2 processes" in ref.stdout
    a, b = student(killed), student(whole)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the same run with the student replicated (DDP) trains the same student, up to the order
    # in which the two strategies sum gradients (float32)
    ddp = tmp_path / "ddp"
    res = subprocess.run(cli(ddp, "ddp"), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    c = student(ddp)
    assert c.keys() == a.keys()
    from safetensors.torch import load_file
    start = load_file(str(whole / "demo" / "student_sft" / "model.safetensors"))  # (before OPD)
    moved = torch.cat([(a[k] - start[k]).flatten() for k in a])
    diff = torch.cat([(a[k] - c[k]).flatten() for k in a])
    assert float(diff.norm() / moved.norm()) < 1e-4, float(diff.norm() / moved.norm())  # (1.5e-6 measured here)


def test_model_parallel_is_fsdp2_data_parallel_with_full_checkpoints():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from opdlm.shard import strategy
    s = strategy("model_parallel", 4)
    assert isinstance(s, ModelParallelStrategy)
    assert (s._data_parallel_size, s._tensor_parallel_size, s._save_distributed_checkpoint) == (4, 1, False)
    assert strategy("ddp", 4) == "ddp" and strategy("fsdp", 2) == "fsdp"


def test_the_units_are_the_decoder_blocks():
    from gather_worker import ARCHS, model

    from opdlm.shard import blocks, is_sharded, plain_class
    for arch in ARCHS:
        m = model(arch)
        assert blocks(m) == list(m.model.layers)
        assert not is_sharded(m) and plain_class(m) is type(m) and split_model(m) is not None


def test_model_parallel_checks_precision_in_one_line():
    with pytest.raises(ConfigError) as e:
        build_run(demo_cfg(*TINY, "trainer.strategy=model_parallel", "trainer.precision=64-true"))
    assert str(e.value).startswith("trainer.strategy: The `ModelParallelStrategy` does not support "
                                   "`Fabric(..., precision='64-true')`")


def test_a_sampler_that_cannot_run_on_a_sharded_student_is_refused_at_build():
    """multi_turn: each process plays its own number of turns, so the collective forwards of a
    sharded student would wait forever; refused in one line. top_p runs under every strategy."""
    from opdlm.builder import check_task
    from opdlm.registry import SAMPLERS
    cfg = demo_cfg(*TINY)
    built = build_run(cfg)
    multi = SAMPLERS.build({"name": "multi_turn"}, "sampler")
    for strategy in ("model_parallel", "fsdp", "deepspeed_stage_3"):
        node = {**cfg, "trainer": {**cfg["trainer"], "strategy": strategy}}
        with pytest.raises(ConfigError) as e:
            check_task(node, built.task, multi, 2)
        assert str(e.value) == (f"sampler: 'multi_turn' cannot run under trainer.strategy={strategy}: a sharded "
                                f"student's forward is collective, but each process plays its episodes for its own "
                                f"number of turns (a documented limit); use strategy ddp (or sampler.name=top_p)")
        check_task(node, built.task, built.sampler, 2)  # top_p
