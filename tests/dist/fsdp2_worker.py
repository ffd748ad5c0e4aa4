"""Steps on 2 CPU processes (gloo, float32) with the student sharded by FSDP2 (opdlm.shard, through
Lightning's model_parallel strategy), for each case of CASES: one OPD step with the top_p sampler,
one with the vllm sampler (one engine per process, synced bucket by bucket from the shards; only
where vllm is installed), and one student SFT step. Each rank saves its rollout (OPD) or batch
(SFT), the gradient of every optimizer step and the parameters after it, all gathered whole, to
OUT/<case>/rank<r>.pt; tests/test_sharded.py (and, for the engine, tests/plugins/samplers/test_vllm.py)
redoes them on one process.

    python tests/dist/fsdp2_worker.py OUT [case ...]
Rank 0 starts rank 1 by re-running this command (opdlm.dist.launch)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from opdlm import dist  # noqa: E402

FSDP2 = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=model_parallel", "trainer.threads=1"]
#: heads of 32 dimensions, as vLLM's CPU attention needs
HEAD32 = ["student.hidden_size=64", "student.heads=2", "teacher.hidden_size=64", "teacher.heads=2"]
OPD = [*HEAD32, "stages.opd.prompts_per_step=4", "sampler.n=2", "sampler.max_new_tokens=14", "sampler.top_p=0.95",
       "stages.opd.max_grad_norm=null", "stages.opd.lr=1.0e-2", "stages.opd.steps=1", "support.k=4",
       # a validation after the step, on a gathered copy, over batches the ranks split unevenly (3 + 1 prompts)
       "stages.opd.val_every=1", "eval.batch_size=3"]
ENGINE = ["sampler.name=vllm", "sampler.sleep=false", "sampler.kv_cache_gib=0.25", "sampler.enforce_eager=true",
          "sampler.sync_bucket_mb=0.01"]  # (buckets of ~10 KB: the sync streams many of them)
SFT = [*HEAD32, "stages.student_sft.batch_size=8", "stages.student_sft.max_grad_norm=null",
       "stages.student_sft.steps=1", "stages.student_sft.lr=1.0e-2"]
CASES = {"opd_top_p": OPD, "opd_vllm": [*ENGINE, *OPD], "sft": SFT}  # (sampler.name first: it resets the options)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor's full value (a sharded DTensor's gathered: every rank calls it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class Record(Callback):
    """The gradients each optimizer step uses (after the reduce-scatter), whole."""

    def __init__(self, model_of) -> None:  # noqa: ANN001
        self.grads: list[list[torch.Tensor]] = []
        self.model_of = model_of

    def on_train_start(self, trainer, module) -> None:  # noqa: ANN001
        trainer.optimizers[0].register_step_pre_hook(lambda *_: self.grads.append(
            [whole(p.grad.detach()).clone() for p in self.model_of(module).parameters()]))


def run_case(name: str, out: Path) -> None:
    from conftest import TINY, demo_cfg

    from opdlm.builder import build_run
    from opdlm.data import TaskData
    from opdlm.module import OPDModule
    from opdlm.sft import SFTModule
    from opdlm.shard import is_sharded
    from opdlm.trainer import make_trainer

    cfg = demo_cfg(*TINY, f"run.out_dir={out}", *CASES[name], *FSDP2)
    built = build_run(cfg)
    seen: list = []
    rng: list = []
    if name == "sft":
        module = SFTModule(cfg, "student", built=built, model=built.student.build(0))
        model_of = lambda m: m.model  # noqa: E731
        step = module.training_step
        module.training_step = lambda batch, batch_idx: seen.append(batch) or step(batch, batch_idx)
        data = TaskData(built.sets("train"), mode="sft", batch_size=8, steps=1, seed=3, tokenizer=built.student.tokenizer)
        stage = "student_sft"
    else:
        module = OPDModule(cfg, built=built, student=built.student.build(0), teacher=built.teacher.build(1))
        model_of = lambda m: m.student  # noqa: E731
        sample = module.sample

        def recorded(*a, **kw):  # noqa: ANN002, ANN003
            assert is_sharded(module.student)  # the rollout came from the sharded student
            rng.append(torch.random.get_rng_state())  # the generator the sampler draws its seeds from
            seen.append(sample(*a, **kw))
            return seen[-1]

        module.sample = recorded
        data = TaskData(built.sets("train"), mode="opd", batch_size=4, steps=1, seed=3)
        stage = "opd"
    rec = Record(model_of)
    trainer = make_trainer(cfg, out / name, stage, 1)
    trainer.callbacks.append(rec)
    trainer.fit(module, datamodule=data)
    model = model_of(module)
    shards = [p for p in model.parameters() if isinstance(p, DTensor)]
    (out / name).mkdir(parents=True, exist_ok=True)
    from opdlm.ops.head import split_model
    from opdlm.shard import plain_class
    names = {"class": type(model).__name__, "plain": plain_class(model).__name__, "split": split_model(model) is not None}
    torch.save({**names, "seen": seen[0], "rng": rng[0] if rng else None, "grads": rec.grads, "sharded": len(shards) == len(list(model.parameters())),
                "local": sum(p.to_local().numel() for p in shards), "total": sum(p.numel() for p in shards),
                "params": [whole(p.detach()).clone() for p in model.parameters()],
                "world": dist.world(), "out": str(out / name)}, out / name / f"rank{dist.rank()}.pt")


def run_worker(out: Path, *cases: str) -> list[dict]:
    """Run this worker for ``cases`` (from a test, with this interpreter); each rank's records by case."""
    import os
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    env.pop("RANK", None)
    res = subprocess.run(["timeout", "-s", "KILL", "900", sys.executable, str(Path(__file__).resolve()), str(out), *cases],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-4000:]
    return [{c: torch.load(out / c / f"rank{r}.pt", weights_only=False) for c in cases} for r in (0, 1)]


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(CASES)
    dist.launch({"accelerator": "cpu", "devices": 2, "num_nodes": 1})
    from opdlm.trainer import quiet_libraries
    quiet_libraries()
    for name in names:
        run_case(name, out)
        dist.barrier()


if __name__ == "__main__":
    main()
