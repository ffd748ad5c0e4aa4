"""A served teacher against the in-process one: the teacher phase of OPD steps (align, the teacher's
scores, support, mask: ``OPDModule.prepare``) on the same rollouts, once with the teacher's weights in
this process and once through ``teacher.server``, with the rollout and student phases of the step
for scale. Reported per step: seconds of each phase, bytes on the wire per scored token (request +
response), requests, and the served teacher's extra time as a share of the in-process step.

The server is started here on a teacher with random weights saved to a temporary folder: the
repository's stand-in (tests/served/teacher_server.py: vLLM's API answered by the same Hugging
Face forward the in-process teacher runs, on one thread, so the server is exactly as fast as the
in-process teacher) or the real vLLM server (``--server vllm``, needs the vllm package). Both sides
run on one thread. ``--device cuda`` puts the in-process student and teacher on the GPU (the real
server then uses the GPU its vLLM build finds). The first step is a warm-up and is not counted.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from opdlm.builder import build_run
from opdlm.config import compose
from opdlm.errors import ConfigError
from opdlm.models import render_prompt, save_hf
from opdlm.module import OPDModule
from opdlm.paths import CONF_DIR

STAND_IN = Path(__file__).resolve().parents[2] / "tests" / "served" / "teacher_server.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, folder: Path, port: int, log: Any) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if kind == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port),
               "--host", "127.0.0.1", "--served-model-name", "teacher", "--max-logprobs", "20", "--dtype", "float32",
               "--enforce-eager"]
        env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
    else:
        if not STAND_IN.is_file():
            raise ConfigError(f"--server stand-in: {STAND_IN} is not here (a repository checkout has it); "
                              f"use --server vllm")
        cmd = [sys.executable, str(STAND_IN), "--model", str(folder), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise ConfigError(f"--server {kind}: the server did not start (its log: {log.name})")


def run(args: Any) -> None:
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch here")

    def now() -> float:  # (GPU work is asynchronous: wait for it before reading the clock)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()
    base = [f"{m}.{k}={v}" for m in ("teacher", "student") for k, v in
            (("hidden_size", args.hidden), ("heads", args.heads), ("layers", args.layers),
             ("intermediate_size", 2 * args.hidden), ("max_positions", 1024))]
    common = [*base, f"sampler.n={args.samples}", f"sampler.max_new_tokens={args.new_tokens}", "sampler.top_p=1.0",
              f"support.k={args.k}", "stages.teacher_sft.steps=0", f"stages.opd.prompts_per_step={args.prompts}",
              "trainer.threads=1", f"teacher.server.top_k={args.top_k}", *args.overrides]
    cfg_in = compose([str(CONF_DIR / "demo.yaml")], common)
    built_in = build_run(cfg_in)
    tmp = tempfile.TemporaryDirectory(prefix="opdlm_bench_served_")
    folder = Path(tmp.name) / "teacher"
    teacher = built_in.teacher.build(1)
    save_hf(teacher, built_in.teacher.tokenizer, folder)
    port = _port()
    log = open(Path(tmp.name) / "server.log", "w")  # noqa: SIM115 (open while the server runs)
    proc = start_server(args.server, folder, port, log)
    try:
        cfg_out = compose([str(CONF_DIR / "demo.yaml")], [*common, f"teacher.server.url=http://127.0.0.1:{port}",
                                                            f"teacher.tokenizer_path={folder}",
                                                            f"teacher.server.max_in_flight={args.in_flight}",
                                                            f"teacher.server.batch_rows={args.batch_rows}"])
        built_out = build_run(cfg_out)
        torch.manual_seed(0)
        student = built_in.student.build(0).to(device)
        teacher.to(device)
        m_in = OPDModule(cfg_in, built=built_in, student=student, teacher=teacher)
        m_out = OPDModule(cfg_out, built=built_out, student=student)
        server = m_out.teacher.server
        opt = m_in.configure_optimizers()
        tok = built_in.student.tokenizer
        train = built_in.task.examples("train")
        rows: list[dict[str, float]] = []
        for step in range(args.steps + 1):
            batch = train[(step * args.prompts) % len(train):][: args.prompts]
            torch.manual_seed(step)
            t0 = now()
            ro = built_in.sampler.sample(student, tok, [render_prompt(tok, e.prompt, False) for e in batch], batch)
            t1 = now()
            view, scores, support, mask = m_in.prepare(ro)
            t2 = now()
            before = dict(server.stats)
            out = m_out.prepare(ro)
            t3 = now()
            m_in.update(ro, view, scores, support, mask, optimizer=opt["optimizer"],
                        scheduler=opt["lr_scheduler"]["scheduler"])
            t4 = now()
            torch.testing.assert_close(out[1].token_logprob[mask], scores.token_logprob[mask], atol=1e-3, rtol=0)
            scored = int(ro.response_mask.sum())
            wire = (server.stats["bytes_sent"] - before["bytes_sent"]) + (server.stats["bytes_received"]
                                                                          - before["bytes_received"])
            if step:  # (the first step warms up)
                rows.append({"rollout": t1 - t0, "teacher_in": t2 - t1, "teacher_served": t3 - t2, "student": t4 - t3,
                             "wire": server.stats["seconds"] - before["seconds"],
                             "bytes_per_token": wire / max(1, scored),
                             "requests": server.stats["requests"] - before["requests"], "tokens": scored})
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        log.close()
        tmp.cleanup()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    step_in = med["rollout"] + med["teacher_in"] + med["student"]
    step_out = med["rollout"] + med["teacher_served"] + med["student"]
    print(f"server: {args.server}; in-process models on {device.type}; {args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens, "
          f"teacher top-{args.top_k} (support K = {args.k}); {args.steps} steps after one warm-up, medians; "
          f"{med['tokens']:.0f} scored tokens a step; requests of {args.batch_rows} rows, {args.in_flight} in flight\n")
    print("| teacher | rollout s | teacher s | of it: requests | student s | step s | bytes / scored token "
          "| requests / step |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| in process | {med['rollout']:.3f} | {med['teacher_in']:.3f} | — | {med['student']:.3f} | {step_in:.3f} "
          f"| — | — |")
    print(f"| served | {med['rollout']:.3f} | {med['teacher_served']:.3f} | {med['wire']:.3f} | {med['student']:.3f} "
          f"| {step_out:.3f} | {med['bytes_per_token']:,.0f} | {med['requests']:.0f} |")
    client = med["teacher_served"] - med["wire"]
    print(f"\nthe served teacher's extra time: {(step_out - step_in) / step_in * 100:+.1f} % of the in-process step; "
          f"its client work outside the requests (the teacher's view, the support, the mask, the scores' tensors): "
          f"{client:.3f} s = {client / step_in * 100:.1f} % of the in-process step, and {client / max(1, med['tokens']) * 1e6:.0f} "
          f"µs per scored token. \"of it: requests\" is the wall time of the requests: the server's work, the wire, "
          f"JSON decoding and the checks of every answer.")
