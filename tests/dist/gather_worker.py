"""Rank r of 2 gloo processes: wrap a small Llama (untied) and Qwen2 (tied embeddings) model in each
of plain, DDP, FSDP1 (flat and original parameters) and FSDP2, run one forward and backward, then
stream its weights with opdlm.gather.full_weights and save what came out to OUT/<case>/rank<r>.pt.

    python tests/dist/gather_worker.py OUT PORT"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch.distributed.tensor import DTensor, init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from opdlm.gather import full_weights  # noqa: E402
from opdlm.shard import shard_fsdp2  # noqa: E402

WRAPS = ("plain", "ddp", "fsdp1", "fsdp1_orig", "fsdp2")
ARCHS = ("llama", "qwen2")
BUCKET = 40_000  # bytes: a few parameters a bucket


def model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)  # (131 rows: shards of unequal size)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=False))
    return Qwen2ForCausalLM(Qwen2Config(**kw, tie_word_embeddings=True))


def wrap(how: str, m: torch.nn.Module) -> torch.nn.Module:
    layer = type(m.model.layers[0])
    if how == "ddp":
        return DistributedDataParallel(m)
    if how.startswith("fsdp1"):
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer})
        return FullyShardedDataParallel(m, auto_wrap_policy=policy, device_id=torch.device("cpu"),
                                        use_orig_params=how == "fsdp1_orig")
    if how == "fsdp2":  # (what trainer.strategy=model_parallel does: each decoder block a unit, then the root)
        shard_fsdp2(m, init_device_mesh("cpu", (dist.get_world_size(),)))
    return m


def traced(m: torch.nn.Module, bucket_bytes: int) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, int]]]:
    """full_weights' output, and the order of its gathers (DTensor.full_tensor) and of the tensors
    it hands out: ("gather", bytes) and ("yield", bytes)."""
    trace: list[tuple[str, int]] = []
    full_tensor = DTensor.full_tensor

    def recorded(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        t = full_tensor(self, *a, **kw)
        trace.append(("gather", t.numel() * t.element_size()))
        return t

    DTensor.full_tensor = recorded
    try:
        got = []
        for n, t in full_weights(m, bucket_bytes=bucket_bytes):
            trace.append(("yield", t.numel() * t.element_size()))
            got.append((n, t.clone()))
    finally:
        DTensor.full_tensor = full_tensor
    return got, trace


def main() -> None:
    out, port = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for arch in ARCHS:
        for how in WRAPS:
            m = wrap(how, model(arch))
            x = torch.randint(0, 131, (2, 9))
            m(input_ids=x, labels=x).loss.backward()  # (lazy initialisation done; no step: the weights are the start's)
            got, trace = traced(m, BUCKET)
            (out / f"{arch}_{how}").mkdir(parents=True, exist_ok=True)
            torch.save(got, out / f"{arch}_{how}" / f"rank{rank}.pt")
            torch.save(trace, out / f"{arch}_{how}" / f"trace{rank}.pt")
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
