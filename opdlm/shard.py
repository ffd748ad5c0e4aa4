"""Sharded students: FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's
``model_parallel`` strategy, and what the rest of opdlm needs to know about a sharded model.

``trainer.strategy=model_parallel`` gives a data-parallel run whose trained model (the student of
the OPD stage, the model of an SFT stage) is sharded with FSDP2 over all processes: each decoder
block (the model's ``_no_split_modules`` classes) is one unit, the rest (embeddings, final norm,
head) the root unit. opdlm builds the strategy itself (``strategy``): data-parallel size = the
number of processes, tensor-parallel size 1, checkpoints as one full file (rank 0 writes it), so
resuming and exporting work as with DDP. Teachers are never sharded (they are not trained).

A sharded model runs its full forward (the logits [B, T, V]): the lean head reads the head's
weight outside the model's forward, where FSDP has not gathered it (``is_sharded``; the scoring
falls back to the naive head path). Evaluations during training run on a gathered copy of the
model on every process (``gathered_copy``), as the test evaluation after a stage does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor

from opdlm.gather import full_weights


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP shards (FSDP1 or FSDP2) or DeepSpeed ZeRO-3 partitions."""
    if isinstance(model, (FSDPModule, FullyShardedDataParallel)) or getattr(model, "_is_fsdp_managed_module", False):
        return True
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def plain_class(model: nn.Module) -> type:
    """The model's own class (FSDP2 swaps a sharded module's class for an ``FSDP<Name>`` subclass)."""
    cls = type(model)
    if isinstance(model, FSDPModule):
        return next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    return cls


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks: modules of the classes its ``_no_split_modules`` names."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_fsdp2(model: nn.Module, mesh: Any) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over ``mesh``: each decoder block one unit, then the root."""
    if isinstance(model, FSDPModule):
        return model  # (configure_model runs again when a Trainer is reused)
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def strategy(name: Any, world: int) -> Any:
    """The strategy object opdlm hands Lightning for the string ``name`` (``model_parallel``: FSDP2
    data parallel over ``world`` processes, full checkpoints), else ``name`` itself."""
    if isinstance(name, str) and name.lower() in ("model_parallel", "modelparallel"):
        from lightning.pytorch.strategies import ModelParallelStrategy
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=False)
    return name


def gathered_copy(model: nn.Module) -> nn.Module:
    """A plain (unsharded) copy of a sharded Hugging Face model with its full weights, on every
    process (collective: every process calls it at the same point). The model itself if it is not
    sharded."""
    if not is_sharded(model):
        return model
    from transformers import AutoModelForCausalLM
    first = next(model.parameters())
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(model.config, torch_dtype=first.dtype)
    state = {name: t.detach().clone() for name, t in full_weights(model)}
    copy.load_state_dict(state, strict=False, assign=True)
    copy.tie_weights()
    missing = [n for n, p in copy.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"gathered copy of {type(copy).__name__}: no weights for {', '.join(missing[:3])}")
    for name, buf in model.named_buffers():  # (rotary tables: not sharded, often not in the state dict)
        owner, _, leaf = name.rpartition(".")
        setattr(copy.get_submodule(owner), leaf, buf.detach().clone())
    copy.generation_config = model.generation_config
    return copy.to(first.device).train(model.training)
