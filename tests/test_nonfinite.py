"""Non-finite numbers never reach the weights (opdlm.guard): every float option is finite (and in its
declared Range) when the config is composed; every optimizer step is checked (stop, or skip) on every
rank alike; no checkpoint, stage folder or loaded model with a NaN or inf is written or trusted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, demo_cfg

from opdlm.builder import build_run
from opdlm.cli import main
from opdlm.config import compose
from opdlm.errors import ConfigError
from opdlm.fingerprint import fingerprint
from opdlm.guard import NonFiniteError, StepGuard, first_nonfinite, guarded_step
from opdlm.models import load_weights, save_hf
from opdlm.registry import KINDS, option_hints
from opdlm.schema import Range, check_type, range_of

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "dist" / "plugins"  # nan_at: LSM that is NaN at chosen steps


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


# -- finite at compose ---------------------------------------------------------------------------
def test_the_reported_command_stops_at_check_naming_the_term_weight(capsys):
    args = ["--check", "run.name=wnan", "loss={name: weighted_sum, terms: [{name: lsm, weight: .nan}]}",
            "stages.teacher_sft.steps=5", "stages.student_sft.steps=5", "stages.opd.steps=3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == "opdlm: config error: command line: loss.terms.0.weight: must be a finite number, got nan"
    args[2] = "loss={name: weighted_sum, terms: [{name: lsm}, {name: sampled_token, weight: .inf}]}"
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith("loss.terms.1.weight: must be a finite number, got inf")


def test_a_non_finite_value_in_a_file_names_its_line(tmp_path):
    conf = tmp_path / "x.yaml"
    conf.write_text("base: " + str(ROOT / "conf" / "demo.yaml") + "\nstages:\n  opd:\n    lr: .inf\n"
                    "loss:\n  name: weighted_sum\n  terms:\n    - {name: lsm}\n")
    with pytest.raises(ConfigError) as e:
        compose([str(conf)], [])
    assert str(e.value) == f"{conf}:4: stages.opd.lr: must be a finite number, got inf"
    conf.write_text(conf.read_text().replace("lr: .inf", "lr: 1.0e-3").replace("{name: lsm}", "{name: lsm, weight: -.inf}"))
    with pytest.raises(ConfigError) as e:
        compose([str(conf)], [])
    assert str(e.value) == f"{conf}:8: loss.terms.0.weight: must be a finite number, got -inf"


@pytest.mark.parametrize("key", ["stages.opd.lr", "stages.teacher_sft.eps", "stages.student_sft.weight_decay",
                                 "stages.opd.max_grad_norm", "stages.opd.betas=[0.9, {}]", "trainer.limit_predict_batches"])
def test_framework_numbers_are_finite(key):
    over = key.format(".nan") if "=" in key else f"{key}=.nan"
    name = key.split("=")[0] + (".1" if "betas" in key else "")
    with pytest.raises(ConfigError) as e:
        demo_cfg(over)
    assert str(e.value) == f"command line: {name}: must be a finite number, got nan"


def _float_options() -> list[tuple[str, str, str]]:
    """(kind, plugin, option) for every registered plugin's option that takes a number with a fraction."""
    out = []
    for kind, (reg, _) in KINDS.items():
        for name in reg.names():
            for opt, tp in option_hints(reg.get(name)).items():
                if check_type(0.5, tp):
                    out.append((kind, name, opt))
    return out


FLOAT_OPTIONS = _float_options()


def test_the_float_options_are_found():
    found = {(n, o) for _, n, o in FLOAT_OPTIONS}
    assert {("top_p", "top_p"), ("top_p", "temperature"), ("jsd", "beta"), ("tail_pg", "max_weight"),
            ("sampled_token", "dual_clip"), ("jsonl", "val_fraction")} <= found


@pytest.mark.parametrize("kind,name,opt", FLOAT_OPTIONS, ids=[f"{k}-{n}-{o}" for k, n, o in FLOAT_OPTIONS])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_every_plugin_float_option_is_finite(kind, name, opt, value):
    reg = KINDS[kind][0]
    with pytest.raises(ConfigError) as e:
        reg.validate({"name": name, opt: value}, kind)
    assert str(e.value) == f"{kind}.{opt}: must be a finite number, got {value!r}"


def _outside(rng: Range, integer: bool) -> list[float]:
    """Values just outside each bound of ``rng`` (the bound itself where it is open)."""
    step = 1 if integer else 1e-3
    out = []
    if rng.gt is not None:
        out.append(rng.gt)
    if rng.ge is not None:
        out.append(rng.ge - step)
    if rng.lt is not None:
        out.append(rng.lt)
    if rng.le is not None:
        out.append(rng.le + step)
    return [int(v) if integer else float(v) for v in out]


def _ranged_options() -> list[tuple[str, str, str, Range, bool]]:
    out = []
    for kind, (reg, _) in KINDS.items():
        for name in reg.names():
            for opt, tp in option_hints(reg.get(name)).items():
                rng = range_of(tp)
                if rng is not None:
                    out.append((kind, name, opt, rng, not check_type(0.5, tp)))
    return out


RANGED = _ranged_options()


@pytest.mark.parametrize("kind,name,opt,rng,integer", RANGED, ids=[f"{k}-{n}-{o}" for k, n, o, _, _ in RANGED])
def test_every_declared_range_is_enforced(kind, name, opt, rng, integer):
    reg = KINDS[kind][0]
    default = reg.defaults(name).get(opt)
    if default is not None:  # the default lies inside
        assert reg.validate({"name": name, opt: default}, kind)[opt] == default
    bad = _outside(rng, integer)
    assert bad
    for v in bad:
        with pytest.raises(ConfigError) as e:
            reg.validate({"name": name, opt: v}, kind)
        note = f" ({rng.note})" if rng.note else ""
        assert str(e.value) == f"{kind}.{opt}: must be {rng.text()}{note}, got {v!r}"


def test_range_texts_and_list_items():
    assert Range(gt=0, le=1).text() == "in (0, 1]"
    assert Range(ge=0, lt=1).text() == "in [0, 1)"
    assert Range(gt=0).text() == "> 0" and Range(ge=2).text() == ">= 2" and Range(le=0.5).text() == "<= 0.5"
    from opdlm.schema import check_bounds
    with pytest.raises(ConfigError) as e:
        check_bounds([0.5, 2.0], list[typing.Annotated[float, Range(le=1)]], "x")
    assert str(e.value) == "x.1: must be <= 1, got 2.0"
    check_bounds(None, typing.Annotated[float, Range(gt=0)] | None, "x")


# -- the guard, step by step ---------------------------------------------------------------------
def _guard(mode: str = "stop", skips: int = 3) -> StepGuard:
    return StepGuard("opd", {"steps": 60, "nonfinite": mode, "nonfinite_skips": skips})


def test_the_guard_names_the_terms_then_the_loss_then_the_gradient():
    t = torch.tensor
    g = _guard()
    assert g.check(1, t(0.5), t(1.0), "the loss (lsm)", {"loss.terms.0 (lsm)": t(1.0)})
    with pytest.raises(NonFiniteError) as e:
        g.check(2, t(math.nan), t(math.nan), "the loss (weighted_sum)",
                {"loss.terms.0 (lsm)": t(1.0), "loss.terms.1 (jsd)": t(math.inf)})
    assert str(e.value) == "stage opd, optimizer step 2 of 60: loss.terms.1 (jsd) is inf; the weights were not updated"
    with pytest.raises(NonFiniteError) as e:
        g.check(3, t(math.nan), t(math.nan), "the loss (lsm)")
    assert str(e.value).startswith("stage opd, optimizer step 3 of 60: the loss (lsm) is nan;")
    with pytest.raises(NonFiniteError) as e:
        g.check(4, t(math.inf), t(0.25), "the loss (lsm)")
    assert str(e.value).startswith("stage opd, optimizer step 4 of 60: the gradient norm is inf;")


def test_skip_counts_and_stops_after_the_limit_in_a_row():
    t = torch.tensor
    g = _guard("skip", skips=2)
    assert g.check(1, t(math.nan), t(1.0)) is False
    assert (g.skipped, g.in_a_row) == (1, 1)
    assert g.check(2, t(1.0), t(1.0)) is True
    assert (g.skipped, g.in_a_row) == (1, 0)
    assert g.check(3, t(math.nan), t(1.0)) is False
    with pytest.raises(NonFiniteError) as e:
        g.check(4, t(1.0), t(math.nan))
    assert str(e.value) == ("stage opd, optimizer step 4 of 60: the loss is nan; that is 2 skipped steps in a row "
                            "(stages.opd.nonfinite_skips = 2), so the run stops; the weights were not updated")
    assert g.skipped == 3


def test_a_skipped_step_changes_no_weight_and_no_optimizer_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    module = SimpleNamespace(_trainer=None, guard=_guard("skip"))
    x = torch.randn(5, 4)

    def step(scale: float) -> torch.Tensor:
        loss = model(x).pow(2).mean() * scale
        loss.backward()
        return guarded_step(module, opt, None, model.parameters(), 1.0, loss.detach())

    step(1.0)  # a real step: the weights move
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()}
    norm = step(math.nan)
    assert math.isnan(float(norm))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    for k, s in opt.state.items():  # Adam's moments and step count untouched (weight decay not applied)
        assert all(torch.equal(v, state[k][n]) for n, v in s.items())
    step(1.0)  # and the next finite step trains again
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert (module.guard.skipped, module.guard.in_a_row) == (1, 0)


def test_an_sft_stage_stops_at_the_step_and_keeps_a_finite_checkpoint(tmp_path):
    """The SFT stages go through the same guard: logits made NaN at the second step stop it there."""
    from opdlm.data import TaskData
    from opdlm.sft import SFTModule
    from opdlm.trainer import make_trainer

    over = [o for o in TINY if not o.startswith("run.checkpoints")]
    cfg = demo_cfg(*over, f"run.out_dir={tmp_path}", "run.checkpoints=true")
    built = build_run(cfg)
    model = built.teacher.build(1)
    calls = []

    def nan_at_second(_module, _inputs, output):  # noqa: ANN001, ANN202
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output

    model.lm_head.register_forward_hook(nan_at_second)
    module = SFTModule(cfg, "teacher", built=built, model=model)
    data = TaskData(built.sets("train"), mode="sft", batch_size=8, steps=3, seed=0, tokenizer=built.teacher.tokenizer)
    trainer = make_trainer(cfg, tmp_path, "teacher_sft", 3)
    with pytest.raises(NonFiniteError) as e:
        trainer.fit(module, datamodule=data)
    ckpt = tmp_path / "checkpoints" / "teacher_sft" / "last.ckpt"
    assert str(e.value).startswith("stage teacher_sft, optimizer step 2 of 3: the loss (cross-entropy) is nan; "
                                   f"the weights were not updated. {ckpt} holds the weights from before this step")
    ck = torch.load(ckpt, weights_only=False)
    assert ck["global_step"] == 1 and ck["opdlm"]["batches_done"] == 1
    assert first_nonfinite(ck["state_dict"].items()) is None
    assert first_nonfinite(model.state_dict().items()) is None


# -- whole runs ----------------------------------------------------------------------------------
def run_cli(out: Path, *extra: str, devices: int = 1) -> subprocess.CompletedProcess:
    over = [o for o in TINY if not o.startswith("run.checkpoints")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    multi = ["trainer.devices=2", "trainer.strategy=ddp", "stages.opd.prompts_per_step=4"] if devices > 1 else []
    cmd = [sys.executable, str(ROOT / "run.py"), *over, f"run.out_dir={out}", "trainer.threads=1",
           f"plugin_paths=[{PLUGINS}]", "stages.opd.steps=6", "run.checkpoint_every=50", *multi, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def student(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(out / "demo" / "student" / "model.safetensors"))


def logged_steps(out: Path) -> list[tuple[int, str]]:
    import csv
    with (out / "demo" / "logs" / "opd" / "metrics.csv").open() as fh:
        return [(int(r["step"]), r["train/grad_norm"]) for r in csv.DictReader(fh) if r.get("train/grad_norm")]


@pytest.mark.slow
def test_a_nan_at_step_three_stops_there_and_skip_continues_from_the_checkpoint(tmp_path):
    loss = "loss={name: nan_at, steps: [3]}"
    stopped = run_cli(tmp_path / "a", loss)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    ckpt = tmp_path / "a" / "demo" / "checkpoints" / "opd" / "last.ckpt"
    assert last_line(stopped.stderr) == (
        f"opdlm: non-finite: stage opd, optimizer step 3 of 6: the loss (nan_at) is nan; the weights were not updated. "
        f"{ckpt} holds the weights from before this step: the same command continues from it with "
        f"stages.opd.nonfinite=skip (drop such steps), or with other optimizer settings of the stage "
        f"(stages.opd.lr, betas, eps, weight_decay, warmup_steps, schedule, max_grad_norm)")
    assert "Traceback" not in stopped.stderr
    ck = torch.load(ckpt, weights_only=False)
    assert ck["global_step"] == 2 and ck["opdlm"]["batches_done"] == 2
    assert first_nonfinite(ck["state_dict"].items()) is None
    assert not (tmp_path / "a" / "demo" / "student").exists() and not (tmp_path / "a" / "demo" / "results.json").exists()

    resumed = run_cli(tmp_path / "a", loss, "stages.opd.nonfinite=skip")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"stage opd: resuming from {ckpt} (optimizer step 2)" in resumed.stdout
    assert "stage opd: 1 optimizer steps were skipped" in resumed.stdout
    assert json.loads((tmp_path / "a" / "demo" / "student" / "stage.json").read_text())["skipped_steps"] == 1
    assert not (ckpt.parent / "stopped.json").exists()  # the stage finished: nothing to continue any more

    whole = run_cli(tmp_path / "b", loss, "stages.opd.nonfinite=skip")  # the same, never stopped
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = student(tmp_path / "a"), student(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert first_nonfinite(b.items()) is None
    steps = logged_steps(tmp_path / "b")
    assert [s for s, _ in steps] == list(range(6)) and steps[2][1] == "nan"
    assert logged_steps(tmp_path / "a") == steps[2:]  # the resumed log continues at the stopped step
    with (tmp_path / "b" / "demo" / "logs" / "opd" / "metrics.csv").open() as fh:
        import csv
        skipped = [float(r["train/skipped_steps"]) for r in csv.DictReader(fh) if r.get("train/skipped_steps")]
    assert skipped == [0, 0, 1, 1, 1, 1]


@pytest.mark.slow
def test_two_processes_stop_alike_when_one_rank_is_not_finite(tmp_path):
    res = run_cli(tmp_path, "loss={name: nan_at, steps: [3], ranks: [1]}", devices=2)
    assert res.returncode == 1, res.stderr[-3000:]
    lines = [x for x in res.stderr.splitlines() if x.startswith("opdlm: non-finite:")]
    assert len(lines) == 1  # rank 0 says it; both ranks stopped (the command returned)
    assert lines[0].startswith("opdlm: non-finite: stage opd, optimizer step 3 of 6: the loss (nan_at) is nan; "
                               "the weights were not updated.")
    ck = torch.load(tmp_path / "demo" / "checkpoints" / "opd" / "last.ckpt", weights_only=False)
    assert ck["global_step"] == 2 and first_nonfinite(ck["state_dict"].items()) is None


@pytest.mark.slow
def test_a_term_and_a_gradient_are_named(tmp_path):
    res = run_cli(tmp_path / "t", "loss={name: weighted_sum, terms: [{name: lsm}, {name: nan_at, steps: [2]}]}",
                  "run.checkpoints=false")
    assert res.returncode == 1, res.stderr[-3000:]
    assert last_line(res.stderr) == (
        "opdlm: non-finite: stage opd, optimizer step 2 of 6: loss.terms.1 (nan_at) is nan; the weights were not "
        "updated. No checkpoint is kept (run.checkpoints is off), so the same command starts the stage again")
    nan_outside = tmp_path / "p"  # a term that is NaN only where it does not count: the step is finite
    nan_outside.mkdir()
    (nan_outside / "nan_outside.py").write_text(
        "import torch\nfrom opdlm.plugin_api import Loss\nfrom opdlm.registry import LOSSES\n"
        "from opdlm.types import LossOutput\n\n\n@LOSSES.register('nan_outside')\nclass NanOutside(Loss):\n"
        "    def __init__(self):\n        self.inner = LOSSES.build({'name': 'lsm'})\n        self.reads = self.inner.reads\n\n"
        "    def compute(self, inputs):\n        out = self.inner.compute(inputs)\n"
        "        return LossOutput(token_loss=torch.where(inputs.mask, out.token_loss, float('nan')))\n")
    res = run_cli(tmp_path / "o", f"plugin_paths=[{PLUGINS},{nan_outside}]",
                  "loss={name: weighted_sum, terms: [{name: lsm}, {name: nan_outside}]}", "run.checkpoints=false")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(tmp_path / "g", "loss={name: nan_at, steps: [1], where: gradient}")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "stage opd, optimizer step 1 of 6: the gradient norm is nan; the weights were not updated." in res.stderr


@pytest.mark.slow
def test_a_stop_in_a_later_mini_batch_continues_from_the_last_batch(tmp_path):
    """With 2 mini-batches per rollout batch a stop in the second one cannot be checkpointed (the first one's update
    is in the weights); the last checkpoint (end of rollout batch 1) is named, and continuing from it with skip gives
    the run that skipped from the start."""
    loss = "loss={name: nan_at, steps: [2], call: 2}"
    mb = ["stages.opd.num_mini_batches=2", "run.checkpoint_every=1"]
    stopped = run_cli(tmp_path / "a", loss, *mb)
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    ckpt = tmp_path / "a" / "demo" / "checkpoints" / "opd" / "last.ckpt"
    assert last_line(stopped.stderr).startswith(
        "opdlm: non-finite: stage opd, optimizer step 4 of 6: the loss (nan_at) is nan; the weights were not updated. "
        f"the step is a later mini-batch of its rollout batch (stages.opd.num_mini_batches), which no checkpoint can split; "
        f"{ckpt} holds the weights of the last checkpoint before it: the same command continues from it with")
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    resumed = run_cli(tmp_path / "a", loss, *mb, "stages.opd.nonfinite=skip")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {ckpt} (optimizer step 2)" in resumed.stdout
    whole = run_cli(tmp_path / "b", loss, *mb, "stages.opd.nonfinite=skip")
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = student(tmp_path / "a"), student(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_skips_in_a_row_stop_and_a_larger_limit_continues(tmp_path):
    loss = "loss={name: nan_at, steps: [3, 4]}"
    stopped = run_cli(tmp_path, loss, "stages.opd.nonfinite=skip", "stages.opd.nonfinite_skips=2")
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert "optimizer step 4 of 6: the loss (nan_at) is nan; that is 2 skipped steps in a row" in stopped.stderr
    assert "continues from it with a larger stages.opd.nonfinite_skips, or with" in stopped.stderr
    ck = torch.load(tmp_path / "demo" / "checkpoints" / "opd" / "last.ckpt", weights_only=False)
    assert ck["global_step"] == 3 and ck["opdlm"]["nonfinite"] == {"skipped": 1, "in_a_row": 1}  # before step 4
    again = run_cli(tmp_path, loss, "stages.opd.nonfinite=skip", "stages.opd.nonfinite_skips=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage opd: 2 optimizer steps were skipped" in again.stdout


@pytest.mark.slow
def test_a_stopped_stage_continues_with_other_optimizer_settings(tmp_path):
    """The issue's promise: after a stop, the same command with a changed optimizer key (a lower lr) continues from
    the stop's checkpoint, trains with the new settings, and says so in stage.json; any other change starts over."""
    loss = "loss={name: nan_at, steps: [3]}"
    assert run_cli(tmp_path / "a", loss).returncode == 1
    ckpt = tmp_path / "a" / "demo" / "checkpoints" / "opd" / "last.ckpt"
    lower = ["stages.opd.lr=0.0003", "stages.opd.betas=[0.8, 0.99]", "stages.opd.nonfinite=skip"]
    res = run_cli(tmp_path / "a", loss, *lower)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (f"stage opd: continuing the stage stopped on a non-finite step from {ckpt} (optimizer step 2) with other "
            f"optimizer settings (lr: 0.0006 -> 0.0003, betas: [0.9, 0.98] -> [0.8, 0.99])") in res.stdout
    info = json.loads((tmp_path / "a" / "demo" / "student" / "stage.json").read_text())
    assert info["continued"]["at_step"] == 2 and set(info["continued"]["changed"]) == {"lr", "betas"}
    final = torch.load(ckpt, weights_only=False)
    group = final["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(0.0003) and tuple(group["betas"]) == (0.8, 0.99)
    fresh = run_cli(tmp_path / "b", loss, *lower)  # the new settings from step 0: another student
    assert fresh.returncode == 0
    a, b = student(tmp_path / "a"), student(tmp_path / "b")
    assert any(not torch.equal(a[k], b[k]) for k in b)
    assert run_cli(tmp_path / "c", loss).returncode == 1  # another change than the optimizer's: from step 0
    res = run_cli(tmp_path / "c", loss, "stages.opd.nonfinite=skip", "support.k=4")
    assert res.returncode == 0 and "not resuming from" in res.stdout and "the stage starts from step 0" in res.stdout


# -- weights that are written or read -------------------------------------------------------------
def _nan_folder(tmp_path: Path) -> tuple[Path, str]:
    built = build_run(demo_cfg(*TINY))
    model = built.teacher.build(1)
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[:3] = float("nan")
    folder = tmp_path / "nan_teacher"
    save_hf(model, built.teacher.tokenizer, folder)
    return folder, name


def test_a_model_folder_with_nan_weights_is_named_at_check_and_never_loaded(tmp_path, capsys):
    folder, name = _nan_folder(tmp_path)
    capsys.readouterr()
    assert main(["--check", *TINY, f"teacher.path={folder}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"opdlm: config error: command line: teacher.path: '{folder / 'model.safetensors'}' holds "
                          f"non-finite weights: ")
    assert "(3 of " in err and "values NaN or inf)" in err
    with pytest.raises(ConfigError) as e:
        load_weights(folder, "teacher.path", torch.float32)
    assert str(e.value).startswith(f"teacher.path: '{folder}' holds non-finite weights: {name} (3 of ")


def test_checkpoints_and_stage_folders_with_nan_weights_are_not_written_or_resumed(tmp_path):
    from opdlm.pipeline import Runner
    from opdlm.sft import SFTModule

    cfg = demo_cfg(*TINY, f"run.out_dir={tmp_path}", "run.checkpoints=true")
    built = build_run(cfg)
    model = built.teacher.build(1)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    module = SFTModule(cfg, "teacher", built=built, model=model)
    with pytest.raises(NonFiniteError) as e:  # a checkpoint
        module.on_save_checkpoint({"state_dict": module.state_dict()})
    assert str(e.value).startswith("stage teacher_sft: the weights hold non-finite values (model.")
    assert str(e.value).endswith("values NaN or inf)); no checkpoint was written")
    runner = Runner(cfg, built)
    with pytest.raises(NonFiniteError) as e:  # a stage folder
        runner._export(None, module, model, built.teacher.tokenizer, tmp_path / "tmp", trained=False, stage="teacher_sft")
    assert "no stage folder was written" in str(e.value) and not (tmp_path / "tmp").exists()
    fp = fingerprint(cfg, "teacher_sft", built)  # a checkpoint to resume from
    path = tmp_path / "demo" / "checkpoints" / "teacher_sft" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "global_step": 2, "opdlm": {"fingerprint": fp}}, path)
    plan = runner._sft_plan("teacher", "arithmetic")
    assert runner._resume_point(plan, fp) == (None, None)
    aside = [p.name for p in path.parent.iterdir()]
    assert len(aside) == 1 and aside[0].startswith("last.ckpt.") and aside[0].endswith(".set-aside")
    # a stopped stage continues under other optimizer keys, except in a shared stage cache
    fine = SFTModule(cfg, "teacher", built=built, model=built.teacher.build(1)).state_dict()
    frame = fingerprint(cfg, "teacher_sft", built, frame=True)
    shared_plan = Runner(demo_cfg(*TINY, f"run.out_dir={tmp_path}", "run.checkpoints=true",
                                  f"run.stage_cache={tmp_path / 'cache'}"), built)._sft_plan("teacher", "arithmetic")
    for shared, expect in ((True, None), (False, str(path))):
        torch.save({"state_dict": fine, "global_step": 2, "opdlm": {"fingerprint": "old", "frame": frame,
                    "optimizer": {"lr": 1.0}}}, path)
        (path.parent / "stopped.json").write_text("{}")
        got, continued = runner._resume_point(shared_plan if shared else plan, fp, frame)
        assert got == expect
        assert (continued is None) == shared
    assert continued["changed"]["lr"] == [1.0, cfg["stages"]["teacher_sft"]["lr"]]


def test_the_nonfinite_policy_is_not_part_of_the_fingerprint():
    base = demo_cfg(*TINY)
    built = build_run(base)
    for stage in ("teacher_sft", "student_sft", "opd"):
        fp = fingerprint(base, stage, built)
        assert fingerprint(demo_cfg(*TINY, f"stages.{stage}.nonfinite=skip", f"stages.{stage}.nonfinite_skips=3"),
                           stage, built) == fp
        assert fingerprint(demo_cfg(*TINY, f"stages.{stage}.lr=0.5"), stage, built) != fp


def test_the_nonfinite_keys_are_checked():
    with pytest.raises(ConfigError) as e:
        build_run(demo_cfg(*TINY, "stages.opd.nonfinite=ignore"))
    assert str(e.value) == "command line: stages.opd.nonfinite: must be stop or skip, got 'ignore'"
    with pytest.raises(ConfigError) as e:
        build_run(demo_cfg(*TINY, "stages.teacher_sft.nonfinite_skips=0"))
    assert str(e.value) == "command line: stages.teacher_sft.nonfinite_skips: must be >= 1, got 0"
