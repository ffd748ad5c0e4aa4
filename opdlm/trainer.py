"""The ``trainer:`` node: any keyword of ``lightning.Trainer`` (checked against its signature), minus
the few that opdlm sets itself from its own keys, plus opdlm's ``progress_bar`` and ``threads``.
``check_trainer`` builds a Trainer from the node before any weights load, so a wrong accelerator,
device count, strategy or precision stops the run with one line that names the key."""

from __future__ import annotations

import inspect
import os
from functools import lru_cache
from typing import Any

from opdlm.errors import ConfigError

#: opdlm's own keys in the trainer node (not Trainer arguments)
OWN_KEYS = ("progress_bar", "threads")

#: Trainer arguments opdlm sets itself, and the key that controls each
MANAGED = {
    "max_steps": "stages.<stage>.steps", "max_epochs": "stages.<stage>.steps", "min_steps": "stages.<stage>.steps",
    "min_epochs": "stages.<stage>.steps", "max_time": "stages.<stage>.steps", "fast_dev_run": "stages.<stage>.steps",
    "limit_train_batches": "stages.<stage>.steps", "overfit_batches": "stages.<stage>.steps",
    "val_check_interval": "stages.<stage>.val_every", "check_val_every_n_epoch": "stages.<stage>.val_every",
    "num_sanity_val_steps": "stages.<stage>.val_every", "limit_val_batches": "eval.val_prompts",
    "limit_test_batches": "eval.test_prompts", "logger": "run.tensorboard (CSV logs are always written)",
    "callbacks": "run.checkpoints", "enable_checkpointing": "run.checkpoints",
    "default_root_dir": "run.out_dir and run.name", "enable_progress_bar": "trainer.progress_bar",
    "gradient_clip_val": "stages.<stage>.max_grad_norm", "gradient_clip_algorithm": "stages.<stage>.max_grad_norm",
    "accumulate_grad_batches": "stages.opd.micro_batches",
    "use_distributed_sampler": "(nothing: opdlm splits every batch over the processes itself)",
}


@lru_cache(maxsize=1)
def trainer_arguments() -> tuple[str, ...]:
    import lightning as L
    return tuple(p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self")


def check_key(key: str) -> str | None:
    """None if ``key`` may appear under trainer:, else the reason it may not."""
    from opdlm.schema import did_you_mean
    if key in OWN_KEYS:
        return None
    if key in MANAGED:
        return f"set by opdlm; use {MANAGED[key]}"
    if key not in trainer_arguments():
        allowed = [k for k in trainer_arguments() if k not in MANAGED] + list(OWN_KEYS)
        return f"not an argument of lightning.Trainer{did_you_mean(key, allowed)}"
    return None


def trainer_kwargs(tr: dict[str, Any]) -> dict[str, Any]:
    """The node's Trainer arguments (opdlm's own keys removed)."""
    return {k: v for k, v in tr.items() if k not in OWN_KEYS}


def _key_of(message: str) -> str:
    low = message.lower()
    for word, key in (("strateg", "strategy"), ("precision", "precision"), ("device", "devices"),
                      ("gpu", "devices"), ("accelerator", "accelerator"), ("num_nodes", "num_nodes")):
        if word in low:
            return f"trainer.{key}"
    return "trainer"


def check_trainer(tr: dict[str, Any]) -> int:
    """Build a Trainer from the node (no process is started, nothing is written); ConfigError on
    what Lightning rejects, on a strategy that spawns processes per Trainer, and on more CPU
    processes than the machine has cores. Returns the number of processes of the run."""
    import logging

    import lightning as L

    strategy = tr.get("strategy", "auto")
    if isinstance(strategy, str):
        from opdlm.dist import SPAWNING
        if any(w in strategy for w in SPAWNING):
            raise ConfigError(f"trainer.strategy: '{strategy}' starts new processes for every Trainer, but opdlm runs "
                              f"all stages in the same processes; use ddp (or fsdp, deepspeed), which opdlm launches once")
    kw = trainer_kwargs(tr)
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # no "GPU available: ..." banner for a check
        lg.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(**{**dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                      enable_model_summary=False, max_steps=1), **kw})
    except Exception as e:  # Lightning raises several types; each becomes one line
        msg = " ".join(str(e).split())
        raise ConfigError(f"{_key_of(msg)}: {msg}") from None
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    from lightning.pytorch.accelerators import CPUAccelerator
    cores = os.cpu_count() or 1
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices * trainer.num_nodes > 1 \
            and trainer.num_devices > cores:
        raise ConfigError(f"trainer.devices: {trainer.num_devices} processes on the CPU, but this machine has "
                          f"{cores} cores")
    return trainer.world_size
