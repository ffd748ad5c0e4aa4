"""A model's full weights, one bounded piece at a time, whatever holds them: ``full_weights(model,
bucket_bytes)`` yields ``(name, tensor)`` with the names of the model's own ``state_dict`` (Hugging
Face names), each tensor whole, for

- a plain module, or one wrapped in DistributedDataParallel: the tensors as they are (nothing to
  gather);
- FSDP2 (``torch.distributed.fsdp.fully_shard``; DTensor parameters): each parameter's full tensor
  (``DTensor.full_tensor``), gathered in buckets of at most ``bucket_bytes`` (a larger parameter
  alone), so at most one bucket of full tensors exists at a time;
- FSDP1 (``FullyShardedDataParallel``): one wrap unit at a time (``summon_full_params`` without
  recursion); a unit is not split, so its size bounds the memory, not ``bucket_bytes``. Tied
  weights come once, under the first name ``named_parameters`` gives (the embedding).

It issues collectives: every process of the sharding group must run the generator to its end, in
the same order, outside the model's forward. A yielded tensor may be a view into a buffer that the
next step frees (FSDP1): use or copy it before asking for the next. DeepSpeed ZeRO-3 parameters are
refused in one line (not supported yet).

This is the weight stream the vllm sampler syncs its engine from (a sharded student's bucket by
bucket), and what opdlm.shard.gathered_copy builds a whole copy from.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

#: prefixes wrappers put into parameter names
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A parameter's name without the prefixes wrappers insert."""
    for p in WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def full_weights(model: nn.Module, bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter of ``model`` (tied ones once), in ``named_parameters``
    order, gathering at most one bucket (FSDP2) or one wrap unit (FSDP1) at a time."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes: must be >= 1, got {bucket_bytes}")
    while isinstance(model, DistributedDataParallel):
        model = model.module
    params = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        raise ValueError("the model's parameters are DeepSpeed ZeRO-3 partitions, which full_weights does not "
                         "gather yet")
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        yield from _fsdp1(model)
        return
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, p in params:
        nbytes = p.numel() * p.element_size()  # (a DTensor's numel is the whole tensor's)
        if bucket and size + nbytes > bucket_bytes:
            yield from _gathered(bucket)
            bucket, size = [], 0
        bucket.append((name, p))
        size += nbytes
    if bucket:
        yield from _gathered(bucket)


def _gathered(bucket: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    full = [(plain_name(n), p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()) for n, p in bucket]
    while full:  # the caller's references only, once it has moved on
        yield full.pop(0)


def _fsdp1(root: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    prefix = {id(m): n for n, m in root.named_modules()}
    for unit in FullyShardedDataParallel.fsdp_modules(root):  # the root unit first, then the nested ones
        pre = prefix[id(unit)]
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            seen: set[int] = set()
            for name, p in _own(unit):
                full = plain_name(f"{pre}.{name}" if pre else name)
                if id(p) in seen or "_flat_param" in full:  # a tied weight's second name; FSDP's own buffer
                    continue
                seen.add(id(p))
                yield full, p.detach()


def _own(unit: nn.Module, pre: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters a FSDP1 unit holds itself (not those of units nested in it), in the order
    ``named_parameters`` walks them."""
    for n, p in unit.named_parameters(recurse=False):
        yield f"{pre}{n}", p
    for cn, c in unit.named_children():
        if not isinstance(c, FullyShardedDataParallel):
            yield from _own(c, f"{pre}{cn}.")
