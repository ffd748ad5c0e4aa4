"""A teacher behind a server (teacher.server): the served scores equal the in-process teacher's, an
OPD run against the server trains the student the in-process teacher trains, across tokenizers too;
a server that is unreachable, serves another model or tokenizer, or returns fewer log-probs than
asked is one line before any training; losses and supports a server cannot feed are refused at
--check; a server that breaks mid-run stops the run with a checkpoint the same command continues
from. The server is tests/served/teacher_server.py, vLLM's API answered by the saved teacher itself; with
OPDLM_SERVED=vllm (CI's vLLM environment runs this file so) it is the real vLLM OpenAI server
(``python -m vllm.entrypoints.openai.api_server``, the CPU build) on models of head size 32, and the
tests that need a scripted fault (a broken answer, a 503 after N requests) kill the real server
instead or are the stand-in's alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import TINY, demo_cfg, qwen_tokenizer_dir
from safetensors.torch import load_file

from opdlm.builder import build_run
from opdlm.errors import ConfigError
from opdlm.models import render_prompt, save_hf
from opdlm.module import OPDModule
from opdlm.pipeline import Runner
from opdlm.served import ServedTeacher, ServedTeacherError, TeacherServer

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "tests" / "served" / "teacher_server.py"
#: OPDLM_SERVED=vllm: the real vLLM server, models of head size 32 (vLLM's CPU attention has no smaller)
VLLM = os.environ.get("OPDLM_SERVED") == "vllm"
BASE = [*TINY, *(["student.hidden_size=64", "student.heads=2", "teacher.hidden_size=64", "teacher.heads=2"]
                 if VLLM else [])]
#: log-probs: the stand-in computes them with the same Hugging Face forward; vLLM with its own kernels
TOL = 2e-4 if VLLM else 1e-5
stand_in_only = pytest.mark.skipif(VLLM, reason="a scripted fault of the stand-in server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """tests/served/teacher_server.py in a subprocess, stopped at exit."""

    def __init__(self, model: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        self.log = tempfile.TemporaryFile("w+")
        if VLLM:
            tokenizer = list(args[args.index("--tokenizer"):][:2]) if "--tokenizer" in args else []
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port",
                   str(self.port), "--host", "127.0.0.1", "--served-model-name", "teacher", "--max-logprobs", "20",
                   "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", *tokenizer]
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                         env={**env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "ERROR"})
            deadline = time.time() + 400
            while time.time() < deadline and self.proc.poll() is None:
                try:
                    urllib.request.urlopen(f"{self.url}/v1/models", timeout=5).read()
                    return
                except OSError:
                    time.sleep(2)
            self.log.seek(0)
            raise AssertionError(f"vllm serve did not start: {self.log.read()[-3000:]}")
        self.proc = subprocess.Popen([sys.executable, str(SERVER), "--model", str(model), "--port", str(self.port),
                                      *args], stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.log.seek(0)
            raise AssertionError(f"the test server did not start: {line}{self.log.read()[-3000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if VLLM and self.proc.poll() is None:  # the server and its engine process
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A teacher trained nowhere (random weights, the demo's character tokenizer), saved as a folder."""
    built = build_run(demo_cfg(*BASE))
    folder = tmp_path_factory.mktemp("teacher")
    save_hf(built.teacher.build(1), built.teacher.tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def server(teacher_dir):
    s = Server(teacher_dir)
    yield s
    s.stop()


def served(url: str, teacher_dir: Path, *extra: str) -> list[str]:
    return [f"teacher.server.url={url}", f"teacher.tokenizer_path={teacher_dir}", "stages.teacher_sft.steps=0",
            "teacher.server.retries=0", *extra]


def rollout_of(built, module) -> object:
    tok = built.student.tokenizer
    ex = built.task.examples("train")[:3]
    torch.manual_seed(0)
    return built.sampler.sample(module.student, tok, [render_prompt(tok, e.prompt, False) for e in ex], ex)


def test_served_scores_equal_the_in_process_teachers(server, teacher_dir):
    cfg_in = demo_cfg(*BASE, f"teacher.path={teacher_dir}", "stages.teacher_sft.steps=0", "support.k=4")
    cfg_out = demo_cfg(*BASE, *served(server.url, teacher_dir), "support.k=4")
    b_in, b_out = build_run(cfg_in), build_run(cfg_out)
    torch.manual_seed(0)
    student = b_in.student.build(0)
    m_in = OPDModule(cfg_in, built=b_in, student=student)
    m_out = OPDModule(cfg_out, built=b_out, student=student)
    assert isinstance(m_out.teacher, ServedTeacher) and not list(m_out.teacher.parameters())  # no weights here
    ro = rollout_of(b_in, m_in)
    v_in, t_in, s_in, mask_in = m_in.prepare(ro)
    v_out, t_out, s_out, mask_out = m_out.prepare(ro)
    m = ro.response_mask
    torch.testing.assert_close(t_out.token_logprob[m], t_in.token_logprob[m], atol=TOL, rtol=0)
    lp_in = t_in.topk_logits - t_in.lse.unsqueeze(-1)  # the in-process top-k as log-probs
    z = torch.cat([lp_in, (t_in.topk_logits.new_full(lp_in.shape[:-1], -1e9)).unsqueeze(-1)], -1)
    clear = (z[..., 3] - z[..., 4]).abs() > 10 * TOL  # where the top-4 is not decided by rounding
    assert torch.equal(t_out.topk_ids[m & clear], t_in.topk_ids[m & clear])
    torch.testing.assert_close(t_out.topk_logits[m], lp_in[m], atol=TOL, rtol=0)
    assert torch.equal(s_out.ids[m & clear], s_in.ids[m & clear]) and torch.equal(mask_out, mask_in)
    torch.testing.assert_close(t_out.support_logits[m].log_softmax(-1), t_in.support_logits[m].log_softmax(-1),
                               atol=TOL, rtol=0)  # renormalised on the support, the constant cancels


def test_an_opd_run_against_the_server_trains_the_student_the_in_process_teacher_trains(server, teacher_dir, tmp_path):
    common = [*BASE, "stages.opd.steps=3", "support.k=4", "trainer.threads=1"]
    Runner(demo_cfg(*common, f"teacher.path={teacher_dir}", "stages.teacher_sft.steps=0",
                    f"run.out_dir={tmp_path / 'in'}")).run()
    r_out = Runner(demo_cfg(*common, *served(server.url, teacher_dir), f"run.out_dir={tmp_path / 'out'}")).run()
    assert r_out["teacher"]["served"] == server.url and r_out["teacher"]["test"] == {}
    a = load_file(str(tmp_path / "in" / "demo" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "demo" / "student" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 10 * TOL
    table = (tmp_path / "out" / "demo" / "results.md").read_text()
    assert "| teacher | — | — |" in table


def test_across_tokenizers_the_served_teacher_reads_its_own_tokens(tmp_path):
    """byte_span + mapped_topk: a BPE student, a character-level teacher behind the server."""
    xtok = ["teacher.tiny_tokenizer=char", "student.tiny_tokenizer=bpe", "student.tiny_vocab=320",
            "aligner.name=byte_span", "support.name=mapped_topk", "support.k=4", "maskers=[{name: chunks}]",
            "loss.name=tail_aware"]
    built = build_run(demo_cfg(*BASE, *xtok))
    folder = tmp_path / "t"
    save_hf(built.teacher.build(1), built.teacher.tokenizer, folder)
    s = Server(folder)
    try:
        cfg_in = demo_cfg(*BASE, *xtok, f"teacher.path={folder}", "stages.teacher_sft.steps=0")
        cfg_out = demo_cfg(*BASE, *xtok, *served(s.url, folder))
        b_in, b_out = build_run(cfg_in), build_run(cfg_out)
        torch.manual_seed(0)
        student = b_in.student.build(0)
        m_in, m_out = OPDModule(cfg_in, built=b_in, student=student), OPDModule(cfg_out, built=b_out, student=student)
        ro = rollout_of(b_in, m_in)
        (_, t_in, s_in, mask), (_, t_out, s_out, mask2) = m_in.prepare(ro), m_out.prepare(ro)
        assert torch.equal(mask, mask2) and bool(mask.any())
        torch.testing.assert_close(t_out.token_logprob[mask], t_in.token_logprob[mask], atol=TOL, rtol=0)
        same = mask.unsqueeze(-1) & s_in.valid & s_out.valid & (s_in.teacher_ids == s_out.teacher_ids)
        assert bool(same.any())
        d_in = t_in.support_logits - t_in.lse.unsqueeze(-1)
        torch.testing.assert_close(t_out.support_logits[same], d_in[same], atol=TOL, rtol=0)
    finally:
        s.stop()


def test_probe_errors_name_the_server(server, teacher_dir):
    def err(*extra: str) -> str:
        with pytest.raises(ConfigError) as e:
            build_run(demo_cfg(*BASE, *extra))
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    port = free_port()
    msg = err(*served(f"http://127.0.0.1:{port}", teacher_dir))
    assert msg.startswith(f"teacher.server.url: cannot reach http://127.0.0.1:{port} (") and "refused" in msg
    assert err(*served(server.url, teacher_dir, "teacher.server.model=big")) == (
        f"teacher.server.model: {server.url} does not serve 'big'; it serves ['teacher']")
    msg = err(*served(server.url, teacher_dir, "teacher.server.top_k=30"))
    assert msg.startswith(f"teacher.server.top_k: teacher.server: {server.url} refused a request for 1 rows: HTTP 400: "
                          f"Requested prompt logprobs of 30, which is greater than max allowed: 20")
    qwen = Server(teacher_dir, "--tokenizer", qwen_tokenizer_dir())
    try:
        msg = err(*served(qwen.url, teacher_dir))
        assert msg.startswith("teacher.server: the server tokenizes 'The quick brown fox") and "not the same teacher" in msg
    finally:
        qwen.stop()


@stand_in_only
@pytest.mark.parametrize("fault,message", [
    ("short", r"returned 1 top log-probs at position 5 \(top_k is 2\)$"),
    ("twice", r"answered choices \[0, 0\] for 2 rows \(0 to 1, once each\)$"),
    ("missing", r"returned 2 top log-probs at position \d+ \(top_k is 2\), without the token there$"),
])
def test_a_broken_answer_is_an_error_never_read(teacher_dir, fault, message):
    s = Server(teacher_dir, "--fault", fault)
    try:
        node = {"url": s.url, "model": "teacher", "top_k": 2, "timeout_s": 30, "max_in_flight": 1, "batch_rows": 2,
                "retries": 0}
        rows = [[3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4]]  # every id of the character tokenizer at every position
        with pytest.raises(ServedTeacherError, match=r"^teacher.server: http://127.0.0.1:\d+ " + message):
            TeacherServer(node).score(rows)
    finally:
        s.stop()


@pytest.mark.parametrize("extra,message", [
    (["loss.name=entropy_aware"], r"^loss.name: loss 'entropy_aware' reads the teacher's entropy, which a served "
                                  r"teacher does not return"),
    (["loss={name: forward_kl, full: true}"], r"^loss.name: loss 'forward_kl' compares the teacher's whole vocabulary"),
    (["support.name=student_topk"], r"^support.name: support 'topk' reads the student's own top-k"),
    (["support.k=21"], r"^support.name: support 'topk' needs the teacher's top-21, but the server returns 20"),
    (["sampler.temperature=0.7"], r"^sampler.temperature: the sampler's temperature is 0.7, but a served teacher"),
    (["stages.teacher_sft.steps=5"], r"^stages.teacher_sft.steps: a served teacher is not trained here"),
    (["teacher.path=/nowhere"], r"^teacher.server.url: a served teacher is not loaded, but teacher.path is set"),
    (["teacher.server.url=ftp://host"], r"^command line: teacher.server.url: must start with http:// or https://"),
])
def test_what_a_served_teacher_cannot_give_is_refused_at_check(server, teacher_dir, extra, message):
    over = [*served(server.url, teacher_dir)]
    if "stages.teacher_sft.steps=5" in extra:
        over.remove("stages.teacher_sft.steps=0")
    with pytest.raises(ConfigError, match=message):
        build_run(demo_cfg(*BASE, *over, *extra))


@pytest.mark.slow
def test_a_server_that_breaks_mid_run_stops_it_and_the_same_command_continues(teacher_dir, tmp_path):
    port = free_port()

    def command(out: Path) -> list[str]:
        return [sys.executable, str(ROOT / "run.py"), *(o for o in BASE if not o.startswith("run.checkpoints")),
                *served(f"http://127.0.0.1:{port}", teacher_dir), f"run.out_dir={out}", "stages.opd.steps=4",
                "support.k=4", "run.checkpoint_every=50", "trainer.threads=1"]

    cmd = command(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    if VLLM:  # the real server, killed when the OPD stage starts
        broken = Server(teacher_dir, port=port)
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("[opdlm] stage opd:"):
                    broken.stop()
                    break
            lines.append(proc.communicate(timeout=600)[0])
            err.seek(0)
            res = subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines), err.read())
        broken.stop()
    else:
        broken = Server(teacher_dir, "--fail-after", "4", port=port)  # the probe, steps 1 and 2 answered; then 503
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        finally:
            broken.stop()
    assert res.returncode == 1, res.stderr[-3000:]
    ckpt = tmp_path / "demo" / "checkpoints" / "opd" / "last.ckpt"
    last = [x for x in res.stderr.splitlines() if x.strip()][-1]
    step = int(last.split("optimizer step ")[1].split()[0]) if "optimizer step " in last else -1
    assert step == 3 or (VLLM and step >= 1), last
    assert last.startswith(f"opdlm: teacher server: stage opd, optimizer step {step} of 4: teacher.server: "
                           f"http://127.0.0.1:{port} did not answer a request for 4 rows after 1 tries (")
    assert last.endswith(f"{ckpt} holds the weights from before this step; once the server answers, the same command "
                         f"continues from it") and "Traceback" not in res.stderr
    assert torch.load(ckpt, weights_only=False)["global_step"] == step - 1
    fixed = Server(teacher_dir, port=port)
    try:
        again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"stage opd: resuming from {ckpt} (optimizer step {step - 1})" in again.stdout
        whole = subprocess.run(command(tmp_path / "whole"), capture_output=True, text=True, env=env, cwd=ROOT,
                               timeout=600)
        assert whole.returncode == 0, whole.stderr[-3000:]
    finally:
        fixed.stop()
    a = load_file(str(tmp_path / "demo" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "demo" / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
