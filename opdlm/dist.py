"""Processes of a run on several devices, and what they share.

A run on N devices is N processes that run the same pipeline in lockstep, all stages in the same
processes. They are started once, before the first stage, by Lightning's own launcher (the one its
DDP strategy uses: rank 0 starts the others by re-running the same command with LOCAL_RANK set);
under ``torchrun`` or a cluster scheduler they already exist and are only joined. The process
group is then initialised, and every Lightning Trainer of the run uses it as it is.

Global rank 0 prints, writes the run folder and decides from the stage cache; the other ranks wait
at barriers and receive its decisions (``broadcast``). With one process every helper here is a
no-op, so the same code runs on one device.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch
import torch.distributed as td
from lightning.fabric import Fabric

#: strategies that start their own worker processes per Trainer: opdlm needs the processes to live
#: across stages, so it accepts only strategies whose processes are started by a launcher script
SPAWNING = ("spawn", "fork", "notebook")


def initialized() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if initialized() else 0


def world() -> int:
    return td.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        td.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if world() == 1:
        return obj
    box = [obj if is_main() else None]
    td.broadcast_object_list(box, src=0)
    return box[0]


def all_keys(keys: list[str]) -> list[str]:
    """The union of every rank's ``keys``, sorted: the same list on every rank."""
    if world() == 1:
        return sorted(keys)
    boxes: list[Any] = [None] * world()
    td.all_gather_object(boxes, sorted(keys))
    return sorted(set().union(*boxes))


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (a new tensor; the input is left alone)."""
    t = t.clone()
    if world() > 1:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def _watch_parent() -> None:
    """A worker started by rank 0 exits when rank 0's process disappears (killed), instead of
    waiting forever in a collective."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=loop, daemon=True, name="opdlm-parent-watch").start()


def launch(trainer_cfg: dict[str, Any]) -> int:
    """Start (or join) the processes of a multi-device run and initialise the process group.
    Returns the world size. With one device it does nothing and returns 1."""
    if initialized():
        return world()

    kw = {k: trainer_cfg[k] for k in ("accelerator", "devices", "num_nodes") if k in trainer_cfg}
    started_by_us = "LOCAL_RANK" in os.environ and "OPDLM_LAUNCHED" in os.environ
    fabric = Fabric(strategy="ddp", **kw)
    if fabric.world_size == 1:
        return 1
    os.environ.setdefault("OPDLM_LAUNCHED", "1")  # inherited by the workers rank 0 starts
    fabric.launch()
    if started_by_us and fabric.local_rank > 0:
        _watch_parent()
    return fabric.world_size


def step_seed(base: int, *parts: int) -> int:
    """A seed for one step of one rank, from the run's seed and integers (stage, step, rank, ...):
    results depend on these numbers alone, not on what ran before (resume, cache, world size)."""
    h = base & 0xFFFFFFFF
    for p in parts:
        h = (h * 1_000_003 + (p & 0xFFFFFFFF) + 0x9E3779B9) % (2**63 - 1)
    return h
