"""One OPD optimizer step on 2 CPU processes (Lightning DDP over gloo, float32) whose rollouts come
from the vllm sampler: one engine per process (vLLM's CPU build). Each rank saves its rollout, the
seed its rollout was drawn from, the synced gradient and the final student parameters to
OUT/vllm/rank<r>.pt; tests/plugins/samplers/test_vllm.py redoes the rollouts on a one-process engine
and the step on one process with the ranks' rollouts concatenated.

    python tests/dist/vllm_step_worker.py OUT
Rank 0 starts rank 1 by re-running this command (opdlm.dist.launch)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "dist"))

import torch  # noqa: E402
from conftest import TINY, demo_cfg  # noqa: E402
from opd_step_worker import Record  # noqa: E402

from opdlm import dist  # noqa: E402
from opdlm.builder import build_run  # noqa: E402
from opdlm.data import TaskData  # noqa: E402
from opdlm.module import OPDModule  # noqa: E402
from opdlm.trainer import make_trainer, quiet_libraries  # noqa: E402

ENGINE = ["sampler.name=vllm", "sampler.sleep=false", "sampler.kv_cache_gib=0.25", "sampler.enforce_eager=true"]
HEAD32 = ["student.hidden_size=64", "student.heads=2", "teacher.hidden_size=64", "teacher.heads=2"]
CASE = [*ENGINE, *HEAD32, "stages.opd.prompts_per_step=4", "sampler.n=2", "sampler.max_new_tokens=14",
        "sampler.top_p=0.95", "stages.opd.max_grad_norm=null", "stages.opd.lr=1.0e-2", "stages.opd.steps=1",
        "support.k=4"]
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.threads=1"]


def main() -> None:
    out = Path(sys.argv[1])
    dist.launch({"accelerator": "cpu", "devices": 2, "num_nodes": 1})
    quiet_libraries()
    cfg = demo_cfg(*TINY, f"run.out_dir={out}", *CASE, *DDP)
    built = build_run(cfg)
    module = OPDModule(cfg, built=built, student=built.student.build(0), teacher=built.teacher.build(1))
    rollouts, seeds = [], []
    sample = module.sample

    def recorded(*a, **kw):  # noqa: ANN002, ANN003
        seeds.append(torch.random.get_rng_state())  # the generator the sampler draws its request seeds from
        rollouts.append(sample(*a, **kw))
        return rollouts[-1]

    module.sample = recorded
    rec = Record()
    data = TaskData(built.sets("train"), mode="opd", batch_size=4, steps=1, seed=3)
    trainer = make_trainer(cfg, out / "vllm", "opd", 1)
    trainer.callbacks.append(rec)
    trainer.fit(module, datamodule=data)
    (out / "vllm").mkdir(parents=True, exist_ok=True)
    torch.save({"rollout": rollouts[0], "rng": seeds[0], "grads": rec.grads,
                "params": [p.detach().clone() for p in module.student.parameters()],
                "rank": dist.rank(), "world": dist.world()}, out / "vllm" / f"rank{dist.rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
