"""Nucleus (top-p) sampling of student rollouts with Hugging Face ``generate`` and its KV cache.

At each step the logits are restricted to the tokenizer's ids (padding rows of the head are never
sampled), divided by ``temperature``, and cut to the smallest set of tokens whose probability
reaches ``top_p``; the token is drawn from what is left. The log-probability of every drawn token
under that processed distribution is recorded as the behaviour log-prob (``Rollout.behaviour_logprobs``).
Options: temperature (> 0), top_p (in (0, 1]), max_new_tokens, n (rollouts per prompt).
Output: a Rollout with B = prompts * n rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from opdlm.plugin_api import Context, Sampler
from opdlm.registry import SAMPLERS
from opdlm.rollouts import Count, Nucleus, Temperature, build_rollout, end_ids, left_pad, require_eos, top_p_filter
from opdlm.types import Example, Rollout


class _Recorder(LogitsProcessor):
    """Processes the logits (vocabulary cut, temperature, top-p) and records the log-prob of each
    token that generate() then picks, keeping one [N, V] tensor alive at a time."""

    def __init__(self, vocab: int, temperature: float, top_p: float, prompt_cols: int) -> None:
        self.vocab, self.temperature, self.top_p, self.prompt_cols = vocab, temperature, top_p, prompt_cols
        self.prev: Tensor | None = None
        self.logprobs: list[Tensor] = []

    def collect(self, input_ids: Tensor) -> None:
        if self.prev is not None:
            tok = input_ids[:, -1:]
            self.logprobs.append(self.prev.gather(1, tok).squeeze(1))
            self.prev = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.collect(input_ids)
        scores = scores.float()
        if scores.shape[-1] > self.vocab:
            scores[:, self.vocab :] = float("-inf")
        scores = top_p_filter(scores / self.temperature, self.top_p)
        self.prev = torch.log_softmax(scores, dim=-1)
        return scores


@SAMPLERS.register("top_p")
class TopP(Sampler):
    """Nucleus sampling with temperature via HF generate (KV cache); records behaviour log-probs."""

    def __init__(self, *, temperature: Temperature = 1.0, top_p: Nucleus = 0.9, max_new_tokens: Count = 64,
                 n: Count = 4) -> None:
        self.temperature, self.top_p, self.max_new_tokens, self.n = temperature, top_p, max_new_tokens, n

    def bind(self, ctx: Context) -> None:
        require_eos(ctx.student_tokenizer)

    @torch.no_grad()
    def sample(self, model: nn.Module, tokenizer: Any, prompt_ids: list[list[int]],
               examples: list[Example], *, greedy: bool = False, n: int | None = None) -> Rollout:
        n = self.n if n is None else n
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids, att = left_pad(prompt_ids, pad_id)
        device = next(model.parameters()).device
        ids, att = ids.to(device), att.to(device)
        rec = _Recorder(len(tokenizer), 1.0 if greedy else self.temperature,
                        1.0 if greedy else self.top_p, ids.shape[1])
        was_training = model.training
        model.eval()
        try:
            # a fresh GenerationConfig: a model folder's own sampling defaults (top_k, repetition
            # penalty, ...) must not change the distribution this sampler promises
            # (generate() fills unset fields from the model's config, so every processor is neutralised)
            gen = GenerationConfig(do_sample=not greedy, num_return_sequences=n, max_new_tokens=self.max_new_tokens,
                                   pad_token_id=pad_id, eos_token_id=end_ids(tokenizer), use_cache=True,
                                   repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                                   bad_words_ids=None, suppress_tokens=None,
                                   begin_suppress_tokens=None, forced_bos_token_id=None,
                                   forced_eos_token_id=None, encoder_repetition_penalty=1.0,
                                   **({} if greedy else {"temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                                         "typical_p": 1.0, "epsilon_cutoff": 0.0,
                                                         "eta_cutoff": 0.0, "min_p": 0.0}))
            saved, model.generation_config = model.generation_config, GenerationConfig()
            try:
                seqs = model.generate(input_ids=ids, attention_mask=att, generation_config=gen,
                                      logits_processor=LogitsProcessorList([rec]))
            finally:
                model.generation_config = saved
        finally:
            model.train(was_training)
        rec.collect(seqs)
        T = seqs.shape[1] - ids.shape[1]
        behaviour = torch.stack(rec.logprobs, dim=1) if rec.logprobs else seqs.new_zeros(seqs.shape[0], 0, dtype=torch.float)
        behaviour = behaviour[:, :T]
        return build_rollout(prompt_ids, examples, n, seqs, ids.shape[1], behaviour,
                             end_ids(tokenizer), pad_id, tokenizer)
