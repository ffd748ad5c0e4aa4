"""opdlm from Python: compose a config, build each stage's LightningModule and data for a
``lightning.Trainer`` of your own, or run the whole experiment as ``python run.py`` does.

    config = opdlm.compose("conf/demo.yaml", "loss.name=lsm")   # what run.py --check composes
    opd = opdlm.build(config).opd()                              # the OPD stage: module and data
    lightning.Trainer(max_steps=opd.steps).fit(opd.module, datamodule=opd.data)
    results = opdlm.run(config)                                  # every stage, as run.py runs them

Plugins registered from Python (``@opdlm.LOSSES.register("my_loss")`` on a class in a notebook
cell) are used by name like the built-in ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from opdlm import dist
from opdlm.builder import BuiltRun, build_run
from opdlm.config import DEFAULT_CONF, to_yaml
from opdlm.config import compose as compose_layers
from opdlm.errors import ConfigError
from opdlm.evaluation import evaluate
from opdlm.layers import Where
from opdlm.module import OPDModule
from opdlm.pipeline import Runner
from opdlm.results import results_table
from opdlm.stages import seed_stage, sft_module, stage_data
from opdlm.trainer import quiet_libraries

__all__ = ["Built", "Config", "Results", "Stage", "build", "compose", "run"]

#: what a stage's model may be given as: a model, a Hugging Face folder, or None (as the config says)
ModelLike = nn.Module | str | Path | None


def compose(*confs: str | Path, overrides: Mapping[str, Any] | Sequence[str] = ()) -> Config:
    """Compose conf/base.yaml, config files and overrides into the checked, resolved config, as
    ``python run.py --check`` does (the same function, the same errors).

    Each positional argument is a word of the command line: a config file (``"conf/x.yaml"``,
    ``"conf=conf/x.yaml"`` or a ``Path``), or an override ``"key=value"`` whose value is read as on
    the command line (``"support.k=16"``, ``"maskers.0.tokens=[a,b]"``). ``overrides`` come after
    them: more ``"key=value"`` words, or a mapping of keys to Python values
    (``{"support.k": 16, "loss.name": "lsm"}``). Files apply in order, then overrides in order;
    later ones win. With no file, the demo (conf/demo.yaml) is composed, as run.py does.

    A bad key, value or file raises ConfigError with the one line ``run.py`` prints after
    "opdlm: config error: ".
    """
    files: list[str] = []
    words: list[Any] = []
    for c in confs:
        if isinstance(c, os.PathLike):
            files.append(os.fspath(c))
        elif not isinstance(c, str):
            raise ConfigError(f"compose: {c!r}: expected a config file or a key=value string, got {type(c).__name__}")
        elif c.startswith("--"):
            raise ConfigError(f"compose: '{c}': a run.py flag, not a config file or key=value")
        elif c.startswith("conf="):
            files.append(c[len("conf="):])
        elif "=" in c:
            words.append(c)
        else:
            files.append(c)
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            if not isinstance(key, str) or not key or "=" in key:
                raise ConfigError(f"compose: overrides: {key!r}: expected a dotted key such as 'support.k'")
            words.append((key, _plain(value)))
    elif isinstance(overrides, str):
        raise ConfigError(f"compose: overrides: expected a list of key=value strings or a mapping, got the string "
                          f"{overrides!r}")
    else:
        for w in overrides:
            if not isinstance(w, str):
                raise ConfigError(f"compose: overrides: {w!r}: expected a key=value string")
            words.append(w)
    where = Where()
    resolved = compose_layers(files or [str(DEFAULT_CONF)], words, where)
    return Config(resolved, where)


def build(config: Mapping[str, Any]) -> Built:
    """Build a composed config (``compose``) before any weights load: every plugin constructed and
    cross-checked, as ``python run.py --check`` does; a problem raises ConfigError with the line
    run.py prints. The stages' modules and data then come from the Built's ``teacher_sft``,
    ``student_sft`` and ``opd``."""
    return Built(config, _build_run(config))


def run(config: Mapping[str, Any]) -> Results:
    """Run every stage of a composed config (``compose``) in its run folder, as ``python run.py``
    does: teacher SFT, student SFT, OPD, then the test evaluation of each model; finished stages
    are kept and reused, and the results table is printed. Returns the Results.

    Errors are raised, not printed: ConfigError (the config), FolderBusy (the run folder holds
    another config's result, or another run is using it), RunInterrupted (Ctrl-C), and the errors a
    plugin, a served teacher or a non-finite step raise. On several devices (trainer.devices),
    call it from a script: the other processes run the same script, as Lightning's DDP does."""
    cfg = dict(config)
    built = _build_run(config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    dist.launch(cfg["trainer"])  # several devices: start (or join) one process per device, once
    quiet_libraries()
    runner = Runner(cfg, built)
    results = runner.run()
    return Results(results, results_table(results, cfg), runner.run_dir.resolve())


class Config(dict):
    """A composed config (``compose``): the plain, resolved dict that ``python run.py --check``
    prints as YAML, which also remembers the file and line (or "command line") that set each key,
    so that ``build`` and ``run`` name them in their errors as the command line does."""

    def __init__(self, resolved: Mapping[str, Any], where: Where | None = None) -> None:
        super().__init__(resolved)
        self.where = where if where is not None else Where()

    def yaml(self) -> str:
        """The config as the YAML text ``python run.py --check`` prints (and a run saves as config.yaml)."""
        return to_yaml(self)


@dataclass
class Stage:
    """One stage of a run, ready for a Lightning Trainer of your own:

        trainer = lightning.Trainer(max_steps=stage.steps)
        trainer.fit(stage.module, datamodule=stage.data)

    ``name`` is teacher_sft, student_sft or opd; ``task`` the task of a teacher's SFT (None for the
    student's stages); ``module`` the LightningModule (opdlm.sft.SFTModule: the trained model is
    ``module.model``; opdlm.module.OPDModule: ``module.student``, the teachers in
    ``module.teachers``); ``data`` its LightningDataModule; ``steps`` the stage's optimizer steps
    (``stages.<stage>.steps``), the Trainer's ``max_steps``. Stages optimise by hand (gradient clipping,
    non-finite steps and validation every ``val_every`` batches are the module's own), so leave
    the Trainer's gradient clipping and gradient accumulation unset."""

    name: str
    task: str | None
    module: L.LightningModule
    data: L.LightningDataModule
    steps: int

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """The metrics of the stage's model on ``split`` ("val" or "test"): ``<split>/acc_greedy``,
        ... (the keys a run's results hold), computed as a run computes them after the stage: on the
        teacher's own task, or on every task for the student."""
        if split not in ("val", "test"):
            raise ConfigError(f"evaluate: split: must be val or test, got {split!r}")
        m: Any = self.module
        return evaluate(m.eval_model, m.eval_tokenizer, m.run, m.hparams["config"], m.chat_template, split,
                        task=m.eval_task)


class Built:
    """A config built before any weights load (``build``): every plugin constructed and bound to
    the tokenizers, every check of ``python run.py --check`` passed. Each stage is made on request
    (its models loaded then), as a Stage for a Lightning Trainer of your own.

    ``config`` is the config (a plain dict), ``run`` the built run (opdlm.builder.BuiltRun: its tasks
    by label, each with its task, teacher, sampler, aligner, support, maskers and loss, and the
    student's tokenizer)."""

    def __init__(self, config: Mapping[str, Any], run: BuiltRun) -> None:
        self.config = dict(config)
        self.run = run

    def _task(self, task: str | None) -> str:
        """The label of ``task``, or of the run's only task."""
        if task is None:
            if len(self.run.tasks) != 1:
                raise ConfigError(f"teacher_sft: this run has {len(self.run.tasks)} tasks ({', '.join(self.run.tasks)}); "
                                  f"name one: teacher_sft(task=...)")
            return next(iter(self.run.tasks))
        if task not in self.run.tasks:
            raise ConfigError(f"teacher_sft: task {task!r} is not a task of this run; tasks: {', '.join(self.run.tasks)}")
        return task

    def teacher_sft(self, task: str | None = None, model: ModelLike = None) -> Stage:
        """The teacher's SFT stage on its task (``task``: a label of ``tasks``; default: the run's only
        task). ``model``: the teacher to train, a model or a Hugging Face folder (default: as the config
        says, teacher.path or a model built in memory)."""
        label = self._task(task)
        spec = self.run.tasks[label].teacher
        if spec.served:
            raise ConfigError(f"teacher_sft: the teacher of task {label!r} is served at {spec.served}; there is "
                              f"nothing to train here")
        return self._sft("teacher", label, spec.node["path"], model)

    def student_sft(self, model: ModelLike = None) -> Stage:
        """The student's SFT stage (its cold start) on every task's reference solutions. ``model``: the
        student to train, a model or a Hugging Face folder (default: as the config says)."""
        return self._sft("student", None, self.run.student.node["path"], model)

    def _sft(self, role: str, task: str | None, path: str | None, model: ModelLike) -> Stage:
        stage = f"{role}_sft"
        seed_stage(self.config, stage)
        init = str(model) if isinstance(model, (str, Path)) else path
        module = sft_module(self.config, self.run, role, task, init, model if isinstance(model, nn.Module) else None)
        return Stage(stage, task, module, stage_data(self.config, self.run, stage, task, lambda: module.batches_done),
                     module.stage["steps"])

    def opd(self, student: ModelLike = None, teacher: ModelLike | Mapping[str, ModelLike] = None) -> Stage:
        """The OPD stage. ``student``: the student to distil into, a model (``student_sft().module.model``
        after its fit) or a Hugging Face folder; ``teacher``: the frozen teacher, the same, or for a run
        of several tasks a mapping from task label to each task's teacher. Left out, each model is
        as the config says (its path, or built in memory)."""
        given = teacher if isinstance(teacher, Mapping) else {label: teacher for label in self.run.tasks}
        unknown = [k for k in given if k not in self.run.tasks]
        if unknown:
            raise ConfigError(f"opd: teacher: {unknown[0]!r} is not a task of this run; tasks: {', '.join(self.run.tasks)}")
        seed_stage(self.config, "opd")
        module = OPDModule(
            self.config, _folder(student), {k: f for k, v in given.items() if (f := _folder(v)) is not None},
            built=self.run, student=student if isinstance(student, nn.Module) else None,
            teacher={k: v for k, v in given.items() if isinstance(v, nn.Module)})
        return Stage("opd", None, module, stage_data(self.config, self.run, "opd", None, lambda: module.batches_done),
                     self.config["stages"]["opd"]["steps"])


class Results(dict):
    """The results of a run (``run``): the dict saved as ``runs/<name>/results.json`` (``seed``;
    ``teacher``, ``student_before`` and ``student_after``, each with its ``test`` metrics, such as
    ``test/acc_greedy``, and its stage ``folder``; ``seconds``, ...). ``table`` is the results table
    run.py prints (and saves as results.md); ``folder`` the run folder (an absolute path)."""

    def __init__(self, results: Mapping[str, Any], table: str, folder: Path) -> None:
        super().__init__(results)
        self.table = table
        self.folder = folder


def _plain(value: Any) -> Any:
    """A Python value as a config holds it: tuples as lists, mappings as dicts, paths as strings."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _build_run(config: Mapping[str, Any]) -> BuiltRun:
    """build_run, its errors located at the file and line that set their key (a Config knows them)."""
    try:
        return build_run(dict(config))
    except ConfigError as e:
        if isinstance(config, Config):
            raise config.where.locate(e) from None
        raise


def _folder(model: ModelLike) -> str | None:
    """A model given as a folder, as a string; None for a model object or None."""
    return str(model) if isinstance(model, (str, Path)) else None
