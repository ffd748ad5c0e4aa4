"""The Lightning Trainer of every stage, and the ``trainer:`` node it is made from: any keyword of
``lightning.Trainer`` (checked against its signature), minus the few that opdlm sets itself from its
own keys, plus opdlm's ``progress_bar`` and ``threads``. ``check_trainer`` builds a Trainer from the
node before any weights load, so a wrong accelerator, device count, strategy or precision stops the
run with one line that names the key; ``make_trainer`` builds a stage's (its progress bar on stderr,
its CSV and TensorBoard logs, its checkpoints); ``quiet_libraries`` keeps the console for opdlm's
own lines."""

from __future__ import annotations

import collections.abc
import contextlib
import inspect
import logging
import os
import pathlib
import sys
import types
import typing
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import lightning as L
import transformers
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from opdlm import dist, shard
from opdlm.errors import ConfigError
from opdlm.schema import did_you_mean

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
    "accumulate_grad_batches": "stages.opd.num_micro_batches",
    "use_distributed_sampler": "(nothing: opdlm splits every batch over the processes itself)",
}


@lru_cache(maxsize=1)
def trainer_arguments() -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self")


def check_key(key: str) -> str | None:
    """None if ``key`` may appear under trainer:, else the reason it may not."""
    if key in OWN_KEYS:
        return None
    if key in MANAGED:
        return f"set by opdlm; use {MANAGED[key]}"
    if key not in trainer_arguments():
        allowed = [k for k in trainer_arguments() if k not in MANAGED] + list(OWN_KEYS)
        return f"not an argument of lightning.Trainer{did_you_mean(key, allowed)}"
    return None


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether a config value (plain YAML data) can be ``hint``: True, False, or None when the hint
    is a class a config cannot spell (a Callback, an Accelerator object), so only Lightning can tell."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is typing.Union or origin is types.UnionType:
        seen = [_fits(value, a) for a in args]
        return True if any(seen) else (None if all(x is None for x in seen) else False)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (list, collections.abc.Iterable, collections.abc.Sequence):
        if not isinstance(value, list):
            return False
        inner = [_fits(v, args[0]) if args else True for v in value]
        return False if False in inner else (None if None in inner else True)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(v, args[1]) is not False for v in value.values())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is pathlib.Path:
        return isinstance(value, str)
    return None


def _hint_text(hint: Any) -> str:
    """A Trainer argument's annotation as a person reads it ("int or null", "one of 16-mixed, ...")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        literals = [x for a in args if typing.get_origin(a) is typing.Literal for x in typing.get_args(a)]
        parts = ([_hint_text(typing.Literal[tuple(literals)])] if literals else []) + [
            _hint_text(a) for a in args if typing.get_origin(a) is not typing.Literal]
        return " or ".join(dict.fromkeys(p for p in parts if p))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (list, collections.abc.Iterable, collections.abc.Sequence):
        return f"a list of {_hint_text(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", pathlib.Path: "a path",
             type(None): "null"}
    return names.get(hint, "")


def check_value(key: str, value: Any) -> str | None:
    """None if ``value`` fits the annotation of lightning.Trainer's argument ``key`` (or when only
    Lightning can tell), else the reason, naming what the argument takes."""
    if key in OWN_KEYS or key not in trainer_arguments():
        return None
    hint = typing.get_type_hints(L.Trainer.__init__).get(key)
    if hint is None or _fits(value, hint) is not False:
        return None
    return f"lightning.Trainer takes {_hint_text(hint) or 'another type'} here, got {value!r} ({type(value).__name__})"


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
    strategy = tr.get("strategy", "auto")
    if isinstance(strategy, str):
        if any(w in strategy for w in dist.SPAWNING):
            raise ConfigError(f"trainer.strategy: '{strategy}' starts new processes for every Trainer, but opdlm runs "
                              f"all stages in the same processes; use ddp (or fsdp, deepspeed), which opdlm launches once")
    kw = trainer_kwargs(tr)
    kw["strategy"] = shard.strategy(kw.get("strategy", "auto"), 1)  # (the sizes are set at the run)
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
    cores = os.cpu_count() or 1
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices * trainer.num_nodes > 1 \
            and trainer.num_devices > cores:
        raise ConfigError(f"trainer.devices: {trainer.num_devices} processes on the CPU, but this machine has "
                          f"{cores} cores")
    return trainer.world_size


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar on stderr, so that ``python run.py > file`` captures opdlm's lines and
    the results table, not thousands of progress updates."""

    def _on_stderr(self, make: Callable[[], Any]) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return make()

    def init_sanity_tqdm(self) -> Any:
        return self._on_stderr(super().init_sanity_tqdm)

    def init_train_tqdm(self) -> Any:
        return self._on_stderr(super().init_train_tqdm)

    def init_validation_tqdm(self) -> Any:
        return self._on_stderr(super().init_validation_tqdm)

    def init_test_tqdm(self) -> Any:
        return self._on_stderr(super().init_test_tqdm)

    def init_predict_tqdm(self) -> Any:
        return self._on_stderr(super().init_predict_tqdm)


def _loggers(cfg: dict[str, Any], run_dir: Path, stage: str) -> list[Any]:
    loggers: list[Any] = [CSVLogger(str(run_dir / "logs"), name=stage, version="")]
    if cfg["run"]["tensorboard"]:
        try:
            import tensorboard  # noqa: F401  (optional: TensorBoard logs when it is installed)
            loggers.append(TensorBoardLogger(str(run_dir / "tb"), name=stage, version=""))
        except ImportError:
            pass
    return loggers


def checkpoint_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / "checkpoints" / stage


def make_trainer(cfg: dict[str, Any], run_dir: Path, stage: str, steps: int, every: int | None = None,
                 name: str | None = None) -> L.Trainer:
    """The stage's Trainer: the trainer node's arguments plus what opdlm sets from its own keys.
    ``every``: optimizer steps between checkpoints (default run.checkpoint_every); ``name``: the
    folder name of its logs and checkpoints (default: the stage; one per task's teacher)."""
    name = name or stage
    tr = cfg["trainer"]
    callbacks: list[Any] = [ProgressBar()] if tr["progress_bar"] else []
    if cfg["run"]["checkpoints"]:
        callbacks.append(ModelCheckpoint(dirpath=str(checkpoint_dir(run_dir, name)), save_last=True,
                                         save_top_k=0, every_n_train_steps=every or cfg["run"]["checkpoint_every"],
                                         enable_version_counter=False))
    kw: dict[str, Any] = dict(enable_model_summary=False)
    kw.update(trainer_kwargs(tr))
    kw["strategy"] = shard.strategy(kw.get("strategy", "auto"), dist.world())
    # validation is the module's own (GenerationEval), not Lightning's loop; every stage optimises by hand
    # (clipping included: opdlm.guard.guarded_step)
    return L.Trainer(
        **kw, max_steps=steps, max_epochs=-1, num_sanity_val_steps=0, limit_val_batches=0,
        enable_progress_bar=tr["progress_bar"], logger=_loggers(cfg, run_dir, name), callbacks=callbacks,
        default_root_dir=str(run_dir), enable_checkpointing=cfg["run"]["checkpoints"],
        use_distributed_sampler=False,
    )


def quiet_libraries() -> None:
    """Keep the console for opdlm's own lines, the progress bar and real warnings: drop library
    banners, per-file loading bars and warnings that do not apply to how opdlm drives Lightning.
    Ranks other than 0 print no warnings at all (rank 0 prints the same ones)."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.distributed", "lightning.pytorch.utilities.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for msg in (".*does not have many workers.*", ".*`training_step` returns `None`.*",
                ".*ModelCheckpoint with manual optimization.*", ".*module\\(s\\) in eval mode.*",
                ".*overridden `transfer_batch_to_device`.*", ".*LeafSpec.*",
                ".*smaller than the logging interval.*", ".*Found keys that are in the model state dict but not in the checkpoint.*",
                ".*Experiment logs directory .* exists and is not empty.*",
                ".*Checkpoint directory .* exists and is not empty.*",
                ".*could not determine the length of.*", ".*is an invalid value for `sync_dist`.*",
                ".*`use_distributed_sampler=False`.*",
                # opdlm's batches resume by themselves (opdlm.data.StepBatches starts at the restored batch)
                ".*resuming from a checkpoint that ended before the epoch ended.*"):
        warnings.filterwarnings("ignore", message=msg)
    if not dist.is_main():
        warnings.simplefilter("ignore")
