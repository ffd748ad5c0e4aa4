"""Assembling a Rollout from sampled sequences: the layout every single-turn sampler promises
(opdlm.types.Rollout), whichever engine drew the tokens (``top_p``: Hugging Face generate;
``vllm``), and the sampling options they share."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor

from opdlm.errors import ConfigError
from opdlm.schema import Range
from opdlm.types import Example, Rollout

#: the sampling options every sampler shares, with their bounds (checked when the config is composed)
Temperature = Annotated[float, Range(gt=0)]
Nucleus = Annotated[float, Range(gt=0, le=1)]  # top_p
Count = Annotated[int, Range(ge=1)]  # max_new_tokens, n


#: attribute of a tokenizer whose eos_token was set to its chat template's end of turn (models.adopt_turn_end):
#: the eos id it had before, which still ends a response when a model writes it
FORMER_EOS = "opdlm_former_eos_id"


def end_ids(tokenizer: Any) -> list[int]:
    """The ids that end a response, the one responses are trained to end with first: the tokenizer's
    eos_token_id (its chat template's end of turn, after models.adopt_turn_end) and the eos id it had before
    that, if any. Generation stops at any of them; a rollout ends at the first."""
    eos = tokenizer.eos_token_id
    former = getattr(tokenizer, FORMER_EOS, None)
    return [eos] + ([former] if former is not None and former != eos else [])


def require_eos(tokenizer: Any) -> None:
    """ConfigError when the tokenizer has no EOS: a response could not end."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("sampler: the student tokenizer has no eos_token; generation could not stop")


def build_rollout(prompt_ids: list[list[int]], examples: list[Example], n: int, sequences: Tensor,
                  prompt_cols: int, behaviour: Tensor, eos_ids: int | list[int], pad_id: int,
                  tokenizer: Any) -> Rollout:
    """Assemble a Rollout from generate()'s sequences [B*n, P+T] and behaviour log-probs [B*n, T]. A
    response ends at its first id of ``eos_ids`` (models.end_ids: several when a base tokenizer's eos
    differs from its chat template's end of turn)."""
    B = sequences.shape[0]
    resp = sequences[:, prompt_cols:]
    T = resp.shape[1]
    ends = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids), dtype=resp.dtype, device=resp.device)
    is_eos = torch.isin(resp, ends)
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    response_mask = ~after_eos
    truncated = ~is_eos.any(-1)
    prompt_att = torch.zeros(B, prompt_cols, dtype=torch.long)
    for i in range(B):
        plen = len(prompt_ids[i // n])
        prompt_att[i, prompt_cols - plen :] = 1
    attention_mask = torch.cat([prompt_att.to(resp.device), response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    input_ids = torch.cat([sequences[:, :prompt_cols], resp.masked_fill(after_eos, pad_id)], dim=1)
    texts = []
    for i in range(B):
        ids = resp[i][response_mask[i] & ~is_eos[i]].tolist()
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        prompt_len=prompt_cols,
        response_mask=response_mask,
        behaviour_logprobs=behaviour[:, :T].masked_fill(after_eos, 0.0),
        truncated=truncated,
        examples=[examples[i // n] for i in range(B)],
        texts=texts,
    )


def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    P = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompt_ids), P), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        if p:
            ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            att[i, P - len(p) :] = 1
    return ids, att


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Set to -inf every logit outside the smallest set whose probability reaches top_p
    (the most likely token is always kept). logits [N, V]. The rule of transformers'
    TopPLogitsWarper, which sums the probabilities from the other end of the sorted vocabulary: on
    rows where a prefix mass falls within rounding of top_p the two can keep different sets
    (measured: 2 of 300,000 random rows of 50 logits, p in {0.1, 0.5, 0.9, 0.95, 0.99}), so this
    one stays: the behaviour log-probs are computed from exactly the set it keeps."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
