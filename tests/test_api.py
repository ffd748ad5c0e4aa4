"""The Python API (opdlm.api): the page docs/python-api.md runs as written, as notebook cells in
order (at tiny sizes: every compose gets the TINY overrides appended), and what it shows happens:
each stage trains, the run returns its results.json and table, and the loss registered in a cell is
the one a fit uses. compose is run.py --check's composition, with its errors; a stage built by the
API trains to the same weights and metrics as the pipeline's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import ROOT, TINY
from transformers import AutoModelForCausalLM

import opdlm
from opdlm import cli
from opdlm.api import Config, Results, Stage
from opdlm.config import compose as compose_layers
from opdlm.errors import ConfigError
from opdlm.module import OPDModule
from opdlm.registry import LOSSES
from opdlm.sft import SFTModule

PAGE = ROOT / "docs" / "python-api.md"


def page_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


def quiet_trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture
def fits(monkeypatch):
    """Every lightning.Trainer.fit call: (module, trainer, its state before, the loss's compute calls)."""
    calls: list[dict] = []
    original = L.Trainer.fit

    def fit(self, model, *args, **kwargs):
        record = {"module": model, "trainer": self, "computes": [],
                  "before": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        if isinstance(model, OPDModule):  # count what the task's loss computes during the fit
            cls = type(model.run.only.loss)
            inner = cls.compute

            def compute(loss, inputs):
                out = inner(loss, inputs)
                record["computes"].append((inputs, out.token_loss.detach()))
                return out
            monkeypatch.setattr(cls, "compute", compute)
        try:
            return original(self, model, *args, **kwargs)
        finally:
            if isinstance(model, OPDModule):
                monkeypatch.setattr(cls, "compute", inner)
            calls.append(record)

    monkeypatch.setattr(L.Trainer, "fit", fit)
    return calls


def changed(record: dict) -> bool:
    after = record["module"].state_dict()
    return any(not torch.equal(v, after[k]) for k, v in record["before"].items() if v.is_floating_point())


def test_page_runs_as_written(tmp_path, monkeypatch, fits, capsys):
    blocks = page_blocks()
    assert len(blocks) == 3 and "opdlm.compose" in blocks[0] and "opdlm.run" in blocks[1] and "@LOSSES.register" in blocks[2]
    (tmp_path / "conf").symlink_to(ROOT / "conf")  # the page's relative conf paths; runs/ and logs stay here
    monkeypatch.chdir(tmp_path)
    composed: list[tuple] = []

    def tiny_compose(*confs, **kw):
        assert not kw, "the page passes overrides as words: TINY goes after them"
        composed.append(confs)
        return compose_api(*confs, *TINY)

    compose_api = opdlm.compose
    monkeypatch.setattr(opdlm, "compose", tiny_compose)
    ns: dict = {"__name__": "__main__"}
    try:
        # 1. compose -> build -> a Trainer of one's own: three stages, each trained for its steps
        exec(compile(blocks[0], "<python-api.md: 1>", "exec"), ns)
        assert [type(r["module"]) for r in fits] == [SFTModule, SFTModule, OPDModule]
        teacher, student, opd = ns["teacher"], ns["student"], ns["opd"]
        for record, stage, steps in zip(fits, (teacher, student, opd), (3, 2, 2)):  # (TINY's steps)
            assert isinstance(stage, Stage) and stage.steps == steps and record["module"] is stage.module
            assert record["trainer"].global_step == steps and changed(record), stage.name
        assert opd.module.student is student.module.model and opd.module.teacher is teacher.module.model
        assert len(fits[2]["computes"]) == 2  # one loss per OPD step (one mini- and micro-batch each)
        printed = capsys.readouterr().out
        metrics = opd.evaluate("test")
        assert "test/acc_greedy" in metrics and repr(metrics) in printed  # what the page prints
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "my_student")
        for k, v in opd.module.student.state_dict().items():
            torch.testing.assert_close(saved.state_dict()[k], v, rtol=0, atol=0)

        # 2. the whole run: results.json as a dict, results.md as its table
        exec(compile(blocks[1], "<python-api.md: 2>", "exec"), ns)
        results = ns["results"]
        assert isinstance(results, Results) and results.folder == tmp_path / "runs" / "demo"
        assert dict(results) == json.loads((results.folder / "results.json").read_text())
        assert results.table + "\n" == (results.folder / "results.md").read_text()
        for key in ("teacher", "student_before", "student_after"):
            assert {"test/acc_greedy", "test/acc_sampled"} <= set(results[key]["test"])
        out = capsys.readouterr().out
        assert f"{results['student_after']['test']['test/acc_greedy']}\n{results.table}\n" in out

        # 3. a loss registered in a cell: the fit computes it, and it is 3 x LSM
        exec(compile(blocks[2], "<python-api.md: 3>", "exec"), ns)
        assert LOSSES.get("my_loss") is ns["MyLoss"] and ns["MyLoss"].__module__ == "__main__"
        assert len(fits) == 3 + 3 + 1  # (the run's three stages are fits too)
        record = fits[-1]
        loss = record["module"].run.only.loss
        assert isinstance(loss, ns["MyLoss"]) and loss.scale == 3 and changed(record)
        assert len(record["computes"]) == 2
        lsm = LOSSES.build({"name": "lsm"})
        for inputs, token_loss in record["computes"]:
            torch.testing.assert_close(token_loss[inputs.mask], 3 * lsm.compute(inputs).token_loss.detach()[inputs.mask])
    finally:
        LOSSES._entries.pop("my_loss", None)
    assert composed[0] == ("conf/demo.yaml", "stages.opd.steps=20")


def test_compose_is_what_check_prints(tmp_path, capsys):
    words = [f"conf={ROOT / 'conf' / 'demo.yaml'}", "loss.name=sampled_token", "support.k=1", *TINY,
             f"run.out_dir={tmp_path}"]
    assert cli.main([*words, "--check"]) == 0
    printed = capsys.readouterr().out
    cfg = opdlm.compose(*words)
    assert isinstance(cfg, Config) and cfg.yaml() == printed
    assert cfg == compose_layers([str(ROOT / "conf" / "demo.yaml")], words[1:])
    # the same config from a Path, the words as overrides, and a mapping of Python values
    again = opdlm.compose(ROOT / "conf" / "demo.yaml", overrides=words[1:])
    assert again == cfg
    mapped = opdlm.compose(ROOT / "conf" / "demo.yaml", *words[3:],
                           overrides={"loss.name": "sampled_token", "support": {"name": "topk", "k": 1}})
    assert mapped == cfg
    assert opdlm.compose(*TINY, f"run.out_dir={tmp_path}") == opdlm.compose(f"conf={ROOT / 'conf' / 'demo.yaml'}",
                                                                          *TINY, f"run.out_dir={tmp_path}")


@pytest.mark.parametrize(("words", "start"), [
    (["loss.nmae=3"], "command line: loss.nmae: unknown key for loss 'lsm'"),
    (["stages.opd.stepz=3"], "command line: stages.opd.stepz: unknown key (did you mean 'steps'?)"),
    (["support.k=0"], "command line: support.k: must be >= 1, got 0"),
    (["loss.name=lsn"], "command line: loss.name: unknown loss 'lsn' (did you mean 'lsm'?)"),
    (["stages.opd.prompts_per_step=500"],  # found by the build, located as run.py locates it
     "command line: stages.opd.prompts_per_step: a batch of 500 is larger than the task's 200 training examples"),
    (["conf=no/such.yaml"], "conf=no/such.yaml: no such config file"),
])
def test_errors_are_the_command_lines(words, start, tmp_path, capsys):
    base = [f"conf={ROOT / 'conf' / 'demo.yaml'}", *TINY, f"run.out_dir={tmp_path}"]
    if words[0].startswith("conf="):
        base = base[1:]
    assert cli.main([*base, *words, "--check"]) == 2
    line = capsys.readouterr().err
    with pytest.raises(ConfigError) as e:
        opdlm.build(opdlm.compose(*base, *words))
    assert line == f"opdlm: config error: {e.value}\n" and str(e.value).startswith(start)


def test_mapping_overrides_are_python_values(tmp_path):
    with pytest.raises(ConfigError, match=r"^command line: support\.k: expected integer, got '16' \(str\)$"):
        opdlm.compose(overrides={"support.k": "16"})
    assert opdlm.compose(*TINY, overrides={"support.k": 16, "maskers": ()})["support"]["k"] == 16
    with pytest.raises(ConfigError, match=r"^compose: '--check': a run\.py flag"):
        opdlm.compose("--check")
    with pytest.raises(ConfigError, match=r"^compose: overrides: expected a list of key=value strings"):
        opdlm.compose(overrides="support.k=16")


def test_stages_of_the_api_train_as_the_pipeline(tmp_path):
    """The student's SFT and OPD built by the API, fitted by a Trainer of one's own from the pipeline's
    own starting points, end at the pipeline's weights and test metrics."""
    cfg = opdlm.compose(*TINY, f"run.out_dir={tmp_path}")
    results = opdlm.run(cfg)
    built = opdlm.build(cfg)
    sft = built.student_sft()
    quiet_trainer(sft.steps).fit(sft.module, datamodule=sft.data)
    opd = built.opd(student=results["student_before"]["folder"], teacher=results["teacher"]["folder"])
    quiet_trainer(opd.steps).fit(opd.module, datamodule=opd.data)
    for stage, key in ((sft, "student_before"), (opd, "student_after")):
        model = stage.module.model if stage.name == "student_sft" else stage.module.student
        saved = AutoModelForCausalLM.from_pretrained(results[key]["folder"]).state_dict()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
        assert stage.evaluate("test") == results[key]["test"]


def test_notebook_plugin_code_is_in_the_fingerprint():
    """A plugin class without a source file (a notebook cell) is fingerprinted by its code: the same
    code gives the same digest, other code another one."""
    from opdlm.fingerprint import class_digest, source_file

    def define(body: str) -> type:
        ns: dict = {"__name__": "__main__"}
        exec(compile(f"from opdlm.plugin_api import Loss\nclass Cell(Loss):\n{body}", "<cell>", "exec"), ns)
        return ns["Cell"]

    a, b = define("    def compute(self, x):\n        return 2 * x\n"), define("    def compute(self, x):\n        return 3 * x\n")
    again = define("\n\n    def compute(self, x):\n        return 2 * x\n")  # (other lines, the same code)
    assert source_file(a) is None  # (__main__ is the test runner's module: not where Cell was defined)
    assert class_digest(a) == class_digest(again) != class_digest(b)
    assert source_file(LOSSES.get("lsm")) == str((ROOT / "plugins" / "losses" / "lsm.py").resolve())


NOTEBOOK = '''
import sys
sys.path.insert(0, {tests!r})
import opdlm
from conftest import TINY
from opdlm import LOSSES
from opdlm.plugin_api import Loss
from opdlm.reads import Reads
from opdlm.types import LossOutput


@LOSSES.register("cell_loss")
class CellLoss(Loss):
    """The student's negative log-prob of its own tokens, times a constant."""

    reads = Reads()

    def compute(self, inputs):
        return LossOutput(token_loss={factor} * -inputs.student.token_logprob)


results = opdlm.run(opdlm.compose(*TINY, "loss.name=cell_loss", "run.out_dir={out}"))
print("after", results["student_after"]["test"]["test/acc_greedy"])
'''


@pytest.mark.slow
def test_a_loss_from_standard_input_runs_and_its_code_is_fingerprinted(tmp_path):
    """A loss registered by code with no file (python reading standard input, as a notebook has none)
    runs end to end; the same code again finds the OPD stage cached, other code computes it anew."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)

    def run(factor: str) -> str:
        code = NOTEBOOK.format(tests=str(ROOT / "tests"), factor=factor, out=tmp_path)
        res = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    first = run("2.0")
    assert "stage opd: loss cell_loss" in first and "after " in first
    assert "[opdlm] stage opd: cached in" in run("2.0")
    changed = run("3.0")
    assert "[opdlm] stage opd: config or code changed" in changed and "stage student_sft: cached in" in changed


def test_package_names_are_the_apis():
    """opdlm.compose, build and run are the API's functions (the module that builds a run is
    opdlm.builder, so no submodule shadows them), and the registries are opdlm.registry's."""
    import opdlm.api
    import opdlm.builder  # noqa: F401  (loaded: it must not replace opdlm.build)
    import opdlm.registry

    assert (opdlm.compose, opdlm.build, opdlm.run) == (opdlm.api.compose, opdlm.api.build, opdlm.api.run)
    assert opdlm.LOSSES is opdlm.registry.LOSSES and opdlm.ConfigError is ConfigError
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        opdlm.nothing  # noqa: B018


@pytest.mark.slow
def test_import_opdlm_stays_cheap():
    """`import opdlm` loads neither torch nor the API until a name of it is used."""
    code = ("import sys, opdlm; print('torch' in sys.modules, 'opdlm.api' in sys.modules); opdlm.compose; "
            "print('opdlm.api' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.stdout.split() == ["False", "False", "True"], res.stderr[-2000:]


def test_stages_of_a_run_of_several_tasks(tmp_path):
    """Each task's teacher has its own SFT stage (its own steps, its own examples); OPD takes a
    teacher per task by label, the rest as the config says."""
    from test_multitask import SMALL, TWO

    built = opdlm.build(opdlm.compose(*SMALL, *TWO, f"run.out_dir={tmp_path}"))
    with pytest.raises(ConfigError, match=r"^teacher_sft: this run has 2 tasks \(add, sub\); name one"):
        built.teacher_sft()
    with pytest.raises(ConfigError, match=r"^teacher_sft: task 'mul' is not a task of this run; tasks: add, sub$"):
        built.teacher_sft(task="mul")
    sub = built.teacher_sft(task="sub")
    assert (sub.steps, sub.task, sub.module.stage["lr"]) == (5, "sub", 0.01)  # tasks.1.teacher_sft
    assert list(sub.data.sets) == ["sub"] and sub.data.sets["sub"] == built.run.tasks["sub"].task.examples("train")
    quiet_trainer(sub.steps).fit(sub.module, datamodule=sub.data)
    assert sub.module.trainer.global_step == 5
    opd = built.opd(teacher={"sub": sub.module.model})
    assert opd.module.teachers["sub"] is sub.module.model and opd.module.teachers["add"] is not sub.module.model
    assert len(opd.module.teachers["add"].model.layers) == 1 and len(sub.module.model.model.layers) == 2
    quiet_trainer(opd.steps).fit(opd.module, datamodule=opd.data)
    assert opd.module.trainer.global_step == opd.steps == 2
    metrics = opd.evaluate("val")
    assert {"val/add/acc_greedy", "val/sub/acc_greedy", "val/acc_greedy"} <= set(metrics)


def test_a_cell_run_again_replaces_its_plugin():
    """Running a cell that registers a plugin again replaces it; another class under its name is refused."""
    cell = ("from opdlm import LOSSES\nfrom opdlm.plugin_api import Loss\n\n"
            "@LOSSES.register('again_loss')\nclass {name}(Loss):\n    '''A loss.'''\n")
    try:
        classes = []
        for name in ("Again", "Again", "Other"):
            ns: dict = {"__name__": "__main__"}
            try:
                exec(compile(cell.format(name=name), "<cell>", "exec"), ns)
            except ConfigError as e:
                assert str(e) == "loss 'again_loss' is registered twice: by __main__.Again and by __main__.Other"
                break
            classes.append(ns[name])
        else:
            pytest.fail("a second class under the same name was accepted")
        assert classes[0] is not classes[1] and LOSSES.get("again_loss") is classes[1]
    finally:
        LOSSES._entries.pop("again_loss", None)
