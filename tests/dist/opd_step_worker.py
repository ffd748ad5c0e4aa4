"""One OPD optimizer step (one rollout batch) on 2 CPU processes with Lightning's DDP strategy over
gloo, in float64, for each case of CASES. Each rank saves its rollouts, the synced gradients seen
at every optimizer step, and the final student parameters to OUT/<case>/rank<r>.pt; the test
(tests/test_data_parallel.py) redoes the step on one process with the ranks' rollouts concatenated.

    python tests/dist/opd_step_worker.py OUT
Rank 0 starts rank 1 by re-running this command (opdlm.dist.launch)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from opdlm import dist  # noqa: E402

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.precision=64-true",
       "trainer.threads=1"]


def cases() -> dict[str, list[str]]:
    from test_lean_head import XTOK
    common = ["stages.opd.prompts_per_step=4", "sampler.n=2", "sampler.max_new_tokens=14", "sampler.top_p=1.0",
              "stages.opd.max_grad_norm=null", "stages.opd.lr=1.0e-2", "stages.opd.steps=1"]
    return {
        "lsm": [*common, "support.k=4"],
        "lsm_seq_mean_micro2": [*common, "support.k=4", "stages.opd.loss_aggregation=seq_mean_token_mean",
                                "stages.opd.num_micro_batches=2"],
        "lsm_lean": [*common, "support.k=4", "stages.opd.head=lean", "stages.opd.student_head_block=5"],
        "sampled_token_mini2_micro2": [*common, "loss.name=sampled_token", "support.name=sampled_token",
                                       "stages.opd.num_mini_batches=2", "stages.opd.num_micro_batches=2", "stages.opd.steps=2"],
        # the untrained BPE student rarely ends a response early: the chunks masker (one-to-one
        # chunks only) makes the ranks' token counts differ instead
        "chunk_pg_xtok": [*common, *XTOK, "maskers=[{name: chunks, one_to_one: true}]",
                          "loss.name=chunk_pg", "stages.opd.num_micro_batches=2"],
    }


class Record(Callback):
    """The gradients each optimizer step uses (after data-parallel sync)."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_train_start(self, trainer, module) -> None:  # noqa: ANN001
        opt = trainer.optimizers[0]
        opt.register_step_pre_hook(lambda *_: self.grads.append(
            [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in module.student.parameters()]))


def run_case(name: str, overrides: list[str], out: Path) -> None:
    from conftest import TINY, demo_cfg

    from opdlm.builder import build_run
    from opdlm.data import TaskData
    from opdlm.module import OPDModule
    from opdlm.trainer import make_trainer

    cfg = demo_cfg(*TINY, f"run.out_dir={out}", *overrides, *DDP)
    built = build_run(cfg)
    module = OPDModule(cfg, built=built, student=built.student.build(0), teacher=built.teacher.build(1))
    rollouts = []
    sample = module.sample
    module.sample = lambda *a, **kw: rollouts.append(sample(*a, **kw)) or rollouts[-1]
    rec = Record()
    st = cfg["stages"]["opd"]
    data = TaskData(built.sets("train"), mode="opd", batch_size=st["prompts_per_step"], steps=1, seed=3)
    trainer = make_trainer(cfg, out / name, "opd", st["steps"])
    trainer.callbacks.append(rec)
    trainer.fit(module, datamodule=data)
    (out / name).mkdir(parents=True, exist_ok=True)
    torch.save({"rollout": rollouts[0], "grads": rec.grads,
                "params": [p.detach().clone() for p in module.student.parameters()],
                "rank": dist.rank(), "world": dist.world()}, out / name / f"rank{dist.rank()}.pt")


SFT = ["stages.student_sft.batch_size=8", "stages.student_sft.max_grad_norm=null", "stages.student_sft.steps=1"]


def run_sft_case(out: Path) -> None:
    """One SFT step of the student: the global token mean of the cross-entropy over both ranks."""
    from conftest import TINY, demo_cfg

    from opdlm.builder import build_run
    from opdlm.data import TaskData
    from opdlm.trainer import make_trainer
    from opdlm.sft import SFTModule

    cfg = demo_cfg(*TINY, f"run.out_dir={out}", *SFT, *DDP)
    built = build_run(cfg)
    module = SFTModule(cfg, "student", built=built, model=built.student.build(0))
    batches = []
    step = module.training_step
    module.training_step = lambda batch, batch_idx: batches.append(batch) or step(batch, batch_idx)
    grads: list[list[torch.Tensor]] = []

    class RecordSFT(Callback):  # after the closure's backward and the gradient sync, before the step
        def on_before_optimizer_step(self, trainer, m, optimizer) -> None:  # noqa: ANN001
            grads.append([p.grad.detach().clone() for p in m.model.parameters()])

    data = TaskData(built.sets("train"), mode="sft", batch_size=8, steps=1, seed=3, tokenizer=built.student.tokenizer)
    trainer = make_trainer(cfg, out / "sft", "student_sft", 1)
    trainer.callbacks.append(RecordSFT())
    trainer.fit(module, datamodule=data)
    (out / "sft").mkdir(parents=True, exist_ok=True)
    torch.save({"batch": batches[0], "grads": grads, "world": dist.world()}, out / "sft" / f"rank{dist.rank()}.pt")


def run_empty_rank_case(out: Path) -> None:
    """Two OPD steps where rank 1 counts no token: its step log lacks the token means rank 0 has.
    Each rank saves what it logged (the ranks must agree, and the run must not wait forever)."""
    from conftest import TINY, demo_cfg

    from opdlm.builder import build_run
    from opdlm.data import TaskData
    from opdlm.module import OPDModule
    from opdlm.trainer import make_trainer

    common = ["stages.opd.prompts_per_step=4", "sampler.n=2", "sampler.max_new_tokens=10", "stages.opd.steps=2",
              "support.k=4", f"plugin_paths=[{ROOT / 'tests' / 'dist' / 'plugins'}]",
              "maskers=[{name: nothing_on_rank_one}]", "trainer.log_every_n_steps=1"]
    cfg = demo_cfg(*TINY, f"run.out_dir={out}", *common, *DDP)
    built = build_run(cfg)
    module = OPDModule(cfg, built=built, student=built.student.build(0), teacher=built.teacher.build(1))
    data = TaskData(built.sets("train"), mode="opd", batch_size=4, steps=2, seed=3)
    trainer = make_trainer(cfg, out / "empty_rank", "opd", 2)
    trainer.fit(module, datamodule=data)
    (out / "empty_rank").mkdir(parents=True, exist_ok=True)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    torch.save({"logged": logged, "rank": dist.rank()}, out / "empty_rank" / f"rank{dist.rank()}.pt")


def main() -> None:
    torch.set_default_dtype(torch.float64)
    out = Path(sys.argv[1])
    dist.launch({"accelerator": "cpu", "devices": 2, "num_nodes": 1})
    from opdlm.trainer import quiet_libraries
    quiet_libraries()
    for name, overrides in cases().items():
        run_case(name, overrides, out)
        dist.barrier()
    run_sft_case(out)
    dist.barrier()
    run_empty_rank_case(out)
    dist.barrier()


if __name__ == "__main__":
    main()
