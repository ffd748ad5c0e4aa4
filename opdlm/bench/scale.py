"""A few OPD steps on 1 and on several processes (CPU, gloo; Lightning's DDP strategy, or the one an
override names, e.g. trainer.strategy=model_parallel for FSDP2-sharded students) with the same
global batch: rollout, teacher, student and communication time per step, response tokens per
second, and the speed-up over one process.

Each configuration runs in its own command (``--case WORLD``), which starts its other processes
through opdlm.dist.launch, exactly as ``python run.py trainer.devices=WORLD`` does. Threads: the
machine's cores are divided between the processes (``--threads`` per process overrides). Phases
are the engine's own methods timed on rank 0: rollout (sample), teacher (align, the teacher's pass,
support, mask), student (loss, backward, optimizer step; includes waiting for the gradient
all-reduce). Communication: the time of each gradient all-reduce (a DDP communication hook that
times the default all-reduce; on several processes it overlaps the backward pass; "-" under other
strategies, whose communication is inside the student phase). The first step
is a warm-up and is not counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from opdlm import dist
from opdlm.builder import build_run
from opdlm.config import compose
from opdlm.data import TaskData
from opdlm.module import OPDModule
from opdlm.paths import CONF_DIR
from opdlm.trainer import make_trainer, quiet_libraries


def run_case(world: int, args: Any) -> dict[str, Any] | None:


    quiet_libraries()
    dist.launch({"accelerator": "cpu", "devices": world, "num_nodes": 1})
    quiet_libraries()
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    over = ["trainer.accelerator=cpu", f"trainer.devices={world}", f"trainer.strategy={'ddp' if world > 1 else 'auto'}",
            "trainer.progress_bar=false", "run.checkpoints=false", "run.tensorboard=false",
            f"stages.opd.prompts_per_step={args.prompts}", f"stages.opd.steps={args.steps + 1}", "stages.opd.val_every=0",
            f"run.out_dir={args.out}", *args.overrides]
    cfg = compose([str(CONF_DIR / "demo.yaml")], over)
    built = build_run(cfg)
    torch.manual_seed(0)
    module = OPDModule(cfg, built=built, student=built.student.build(0), teacher=built.teacher.build(1))
    times: dict[str, list[float]] = {}
    tokens: list[int] = []

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            r = fn(*a, **kw)
            times.setdefault(name, []).append(time.perf_counter() - t0)
            return r
        return wrapper

    sample = module.sample

    def sample_and_count(*a: Any, **kw: Any) -> Any:
        ro = sample(*a, **kw)
        tokens.append(int(dist.all_sum(ro.response_mask.sum()).item()))
        return ro

    module.sample = timed("rollout", sample_and_count)
    module.prepare = timed("teacher", module.prepare)  # align, the teacher's pass, support, mask
    module.update = timed("student", module.update)
    comm: list[float] = []
    step_comm: list[float] = []
    hooked: list[bool] = []

    class Timer(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            model = trainer.strategy.model
            if hasattr(model, "register_comm_hook"):
                def hook(_state: Any, bucket: Any) -> Any:
                    t0 = time.perf_counter()
                    fut = torch.distributed.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()

                    def done(f: Any) -> Any:
                        comm.append(time.perf_counter() - t0)
                        return f.value()[0]
                    return fut.then(done)
                # DDP checks the annotations as objects (this file's are strings)
                hook.__annotations__ = {"bucket": torch.distributed.GradBucket,
                                        "return": torch.futures.Future[torch.Tensor]}
                model.register_comm_hook(None, hook)
                hooked.append(True)

        def on_train_batch_start(self, *_: Any) -> None:
            comm.clear()

        def on_train_batch_end(self, *_: Any) -> None:
            step_comm.append(sum(comm))

    data = TaskData(built.sets("train"), mode="opd", batch_size=args.prompts, steps=args.steps + 1, seed=0)
    trainer = make_trainer(cfg, Path(args.out), "opd", args.steps + 1)
    trainer.callbacks.append(Timer())
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - t0
    if not dist.is_main():
        return None

    def mean(xs: list[float]) -> float:
        xs = xs[1:]  # the first step warms up
        return sum(xs) / max(1, len(xs))

    step = {k: mean(v) for k, v in times.items()}
    total = sum(step.values())
    return {"world": world, "threads": threads, "rollout_s": step.get("rollout", 0.0),
            "teacher_s": step.get("teacher", 0.0), "student_s": step.get("student", 0.0),
            "comm_s": (mean(step_comm) if world > 1 else 0.0) if hooked or world == 1 else None, "step_s": total,
            "strategy": type(trainer.strategy).__name__.removesuffix("Strategy"),
            "tokens_per_s": mean([float(t) for t in tokens]) / total if total else 0.0, "wall_s": wall}


def run(args: Any) -> int:
    """Run each process count as its own command and print the table; 1 (after one line saying why)
    when a case failed."""
    worlds = args.worlds
    failures: list[str] = []
    print(f"OPD steps on CPU processes (gloo), conf/demo.yaml models, {args.prompts} prompts x "
          f"sampler.n rollouts per global step, {args.steps} timed steps after 1 warm-up"
          + (f", overrides {' '.join(args.overrides)}" if args.overrides else ""))
    rows = []
    for w in worlds:
        # a module run (not -c): the other processes are started by re-running this command line
        cmd = [sys.executable, "-m", "opdlm.bench.cli", "scale", "--case", str(w), f"--steps={args.steps}", f"--prompts={args.prompts}",
               f"--threads={args.threads}", f"--out={args.out}", *args.overrides]
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "OPDLM_LAUNCHED")}
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        line = [x for x in res.stdout.splitlines() if x.startswith("{")]
        if res.returncode or not line:
            print(f"{w} processes: failed\n{res.stderr[-3000:]}", file=sys.stderr)
            said = [x.strip() for x in res.stderr.splitlines() if x.strip()]
            failures.append(f"{w} processes: {said[-1] if said else f'exit code {res.returncode}'}")
            continue
        rows.append(json.loads(line[-1]))
    print()
    print("| processes | strategy | threads each | rollout s/step | teacher s/step | student s/step | gradient all-reduce s/step | "
          "step s | response tokens/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = rows[0]["step_s"] if rows else 1.0
    for r in rows:
        comm = "-" if r["comm_s"] is None else f"{r['comm_s']:.3f}"  # (timed for DDP's all-reduce only)
        print(f"| {r['world']} | {r['strategy']} | {r['threads']} | {r['rollout_s']:.3f} | {r['teacher_s']:.3f} | "
              f"{r['student_s']:.3f} | {comm} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {base / r['step_s']:.2f}x |")
    if failures:
        print(f"bench.py scale: {len(failures)} case(s) failed, the first: {failures[0]}", file=sys.stderr)
        return 1
    return 0
