"""`opdlm report`: the pictures and the token view of a real tiny run, and of a sweep folder; the
token view's colours match the logged numbers; validation values are logged at their own step
only; clear messages without matplotlib and for a folder that is not a run."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from html.parser import HTMLParser

import pytest
from conftest import TINY

from opdlm.cli import main
from opdlm.report import gap_colour


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main([*TINY, f"run.out_dir={out}", "run.name=r", "stages.opd.steps=3", "stages.opd.val_every=2",
                 "stages.opd.log_rollouts=2", "eval.val_prompts=2"]) == 0
    return out / "r"


def _png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_run_report_writes_curves_gap_and_tokens(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert _png(run_dir / "report" / "curves.png") and _png(run_dir / "report" / "gap_by_position.png")
    assert (run_dir / "report" / "tokens.html").is_file()
    rows = list(csv.DictReader((run_dir / "logs" / "opd" / "metrics.csv").open()))
    assert any(r.get("train/gap_pos/0-15/mean") for r in rows)
    assert any(r.get("train/rollout_vs_trainer/prob_diff_mean") for r in rows)
    # validation ran once (step 2 of 3): its values are in the log once, not repeated later
    assert sum(bool(r.get("val/acc_greedy")) for r in rows) == 1


class Spans(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001
        if tag == "span":
            self.spans.append(dict(attrs))


def test_token_view_colours_are_the_logged_gaps(run_dir):
    main(["report", str(run_dir)])
    records = [json.loads(line) for f in sorted((run_dir / "rollouts" / "opd").glob("step_*.jsonl"))
               for line in f.read_text().splitlines()]
    assert len(records) == 2 and all(r["step"] == 2 for r in records)
    tokens = [t for r in records for t in r["tokens"]]
    for t in tokens:
        if t["gap"] is not None:
            assert t["gap"] == pytest.approx(t["teacher"] - t["student"])
            assert t["topk"] and all(0.0 <= p <= 1.0 for _, p in t["topk"])
    page = Spans()
    page.feed((run_dir / "report" / "tokens.html").read_text())
    assert len(page.spans) == len(tokens)
    for span, t in zip(page.spans, tokens):
        assert span["style"] == f"background:{gap_colour(t['gap'])}"
        assert (span["data-gap"] == "") == (t["gap"] is None)
        if t["gap"] is not None:
            assert float(span["data-gap"]) == t["gap"]
            assert "teacher top-K" in span["title"]
    assert gap_colour(-3.0) == "#ff0000" and gap_colour(3.0) == "#0000ff" and gap_colour(0.0) == "#ffffff"


def test_sweep_report_draws_overlays_with_seed_bands(run_dir, tmp_path):
    sweep = tmp_path / "sweep"
    for name in ("lsm_s0", "lsm_s1", "other_s0"):  # as sweep.py lays them out: <overlay>_s<seed>/<run.name>/
        shutil.copytree(run_dir / "logs", sweep / name / "r" / "logs")
    assert main(["report", str(sweep)]) == 0
    assert _png(sweep / "report" / "sweep.png")


def test_without_matplotlib_it_says_what_to_install(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    shutil.rmtree(run_dir / "report", ignore_errors=True)
    assert main(["report", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert 'no PNG was drawn: pip install "opdlm[plots]"' in err
    assert (run_dir / "report" / "tokens.html").is_file() and not (run_dir / "report" / "curves.png").exists()


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opdlm: report: ") and "logs/opd/metrics.csv" in err and "\n" not in err
    assert main(["report"]) == 2


def test_a_metrics_file_without_values_or_not_text_is_one_line(tmp_path, capsys):
    log = tmp_path / "r" / "logs" / "opd" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("epoch,step,train/loss,train/grad_norm\n")  # a stage stopped before its first log row
    assert main(["report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"opdlm: report: '{log}' holds no logged values yet (the OPD stage logs every "
                   f"trainer.log_every_n_steps optimizer steps), so there are no curves to draw")
    log.write_bytes(b"epoch,step,train/loss\n0,1,\xff\xfe\x00\x81\n")
    assert main(["report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"opdlm: report: '{log}' is not a readable metrics.csv (UnicodeDecodeError: ") and "\n" not in err


def test_token_view_renders_in_a_headless_browser(run_dir, tmp_path):
    """Where a Chromium is installed: the page, rendered, shows every counted token's colour."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless browser here; test_token_view_colours_are_the_logged_gaps parses the page instead")
    import subprocess

    import matplotlib.image
    main(["report", str(run_dir)])
    shot = tmp_path / "page.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1400,3000", (run_dir / "report" / "tokens.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = (matplotlib.image.imread(str(shot))[..., :3] * 255).round().astype(int)
    seen = {f"#{r:02x}{g:02x}{b:02x}" for r, g, b in {tuple(px) for px in img.reshape(-1, 3).tolist()}}
    records = [json.loads(line) for f in sorted((run_dir / "rollouts" / "opd").glob("step_*.jsonl"))
               for line in f.read_text().splitlines()]
    want = {gap_colour(t["gap"]) for r in records for t in r["tokens"] if t["counted"]}
    assert want and want <= seen, sorted(want - seen)[:5]


def test_a_micro_batch_without_counted_tokens_logs_no_means():
    """Token means over no token are left out, not logged as 0 (a collapsed run showed 'teacher
    top-K mass 0')."""
    import plugin_testkit as kit
    import torch

    from opdlm.ops.diagnostics import loss_diagnostics
    from opdlm.types import Scores
    z = torch.randn(2, 3, 5)
    sc = Scores(token_logprob=torch.log_softmax(z, -1)[..., 0], lse=torch.logsumexp(z, -1),
                topk_ids=z.topk(2, -1).indices, topk_logits=z.topk(2, -1).values, entropy=torch.ones(2, 3))
    x = kit.build_loss_inputs(student=sc, teacher=sc, mask=torch.zeros(2, 3, dtype=torch.bool))
    out = loss_diagnostics(x, torch.zeros(2, 3), {}, [0, 16])
    assert set(out) == {"loss", "tokens"} and float(out["tokens"]) == 0.0
    full = loss_diagnostics(kit.build_loss_inputs(student=sc, teacher=sc), torch.zeros(2, 3), {}, [0, 16])
    assert {"teacher_topk_mass", "logprob_gap", "gap_pos/0-15/mean", "rollout_vs_trainer/prob_diff_mean"} <= set(full)


def test_a_multi_task_runs_curves_have_one_line_per_task(tmp_path):
    from opdlm.report import _pyplot, curves_png, per_task_panels
    metrics = {"train/loss": [(1, 1.0), (2, 0.5)], "train/math/loss": [(1, 1.0)], "train/game/loss": [(2, 0.5)],
               "val/game/acc_greedy": [(2, 0.4)], "train/episode/won_frac": [(2, 0.3)]}
    assert per_task_panels(metrics) == [("loss per task", [("train/game/loss", "game"), ("train/math/loss", "math")]),
                                        ("val accuracy per task (greedy)", [("val/game/acc_greedy", "game")])]
    plt = _pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    png = curves_png(plt, metrics, tmp_path / "curves.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
