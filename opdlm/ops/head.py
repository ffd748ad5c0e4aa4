"""Turn a model's hidden states at response positions into the quantities losses consume
(sampled-token log-probs, log-sum-exp, logits gathered on a support, the model's own top-k,
entropy), so that no loss ever touches a [B, T, V] tensor itself.

``head_scores`` walks the positions in blocks: under ``torch.no_grad`` (the teacher) the full
logits exist for one block at a time; with gradients (the student, naive path) each block's logits
stay alive for backward, which is what the memory-lean path replaces.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from opdlm.types import Scores


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(body, lm_head) of a Hugging Face causal LM whose logits are ``lm_head(body(x))``, or None
    when the head cannot be separated (logit soft-capping or scaling, unknown layout, a sharded model)."""
    if getattr(model, "_is_fsdp_managed_module", False) or type(model).__name__.startswith("FullyShardedDataParallel"):
        return None  # sharded (opdlm.shard): the head's weight is gathered only inside the model's forward
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if cfg is not None and getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or body is None or body is model:
        return None
    return body, head


def response_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                    position_ids: Tensor, pred_columns: Tensor) -> tuple[Tensor, nn.Linear | None]:
    """Hidden states [B, T, H] at the columns that predict each response token, and the head that
    maps them to logits. Falls back to full logits (head None) when the model cannot be split."""
    feats, head = model_hidden(model, input_ids, attention_mask, position_ids)
    return gather_columns(feats, pred_columns), head


def gather_columns(feats: Tensor, columns: Tensor) -> Tensor:
    """feats [B, L, H] at ``columns`` [B, T] (negative columns read column 0; mask them)."""
    idx = columns.clamp_min(0)
    return torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))


def model_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 position_ids: Tensor) -> tuple[Tensor, nn.Linear | None]:
    """Last hidden states [B, L, H] and the LM head, or the logits [B, L, V] and None when the head
    cannot be separated from the body."""
    split = split_model(model)
    if split is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False)
        feats = out.logits
        head = None
    else:
        body, head = split
        feats = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    return feats, head


def bucket_logsumexp(logits: Tensor, buckets: Tensor, n_buckets: int) -> Tensor:
    """[N, n_buckets]: log Σ_{v: buckets[v] = b} exp(logits[:, v]) (-inf for an empty bucket).
    Each bucket is shifted by its own (detached) maximum, so no bucket underflows."""
    N, V = logits.shape
    idx = buckets[:V].unsqueeze(0).expand(N, V)
    with torch.no_grad():
        top = logits.new_full((N, n_buckets), float("-inf")).scatter_reduce(1, idx, logits, "amax")
        shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sums = logits.new_zeros(N, n_buckets).index_add(1, buckets[:V], (logits - shift.gather(1, idx)).exp())
    return sums.log() + shift


def _logits(feats: Tensor, head: nn.Linear | None, temperature: float) -> Tensor:
    logits = feats if head is None else head(feats)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax statistics in fp32 at least
    return logits / temperature if temperature != 1.0 else logits


def _flat_support(support_ids: Tensor | None, n: int) -> Tensor | None:
    return support_ids.reshape(n, -1) if support_ids is not None else None


def _block_logits(f: Tensor, head: nn.Linear | None, targets: Tensor, sup: Tensor | None, temperature: float,
                  vocab_rows: int | None, block: int | None):
    """For each block of positions of ``f`` [n, H]: (logits [c, V] over the tokenizer's rows divided
    by the temperature, the sampled ids [c] (negative read as 0), the support ids [c, K] or None)."""
    n = f.shape[0]
    tgt = targets.reshape(n).clamp_min(0)
    step = max(1, block or n)
    for s in range(0, n, step):
        logits = _logits(f[s : s + step], head, temperature)
        if vocab_rows is not None and vocab_rows < logits.shape[-1]:
            logits = logits[:, :vocab_rows]
        yield logits, tgt[s : s + step], (sup[s : s + step] if sup is not None else None)


def head_scores(feats: Tensor, head: nn.Linear | None, targets: Tensor, *, temperature: float = 1.0,
                support_ids: Tensor | None = None, topk: int = 0, entropy: bool = True,
                vocab_rows: int | None = None, block: int | None = None,
                buckets: Tensor | None = None, n_buckets: int = 0) -> Scores:
    """Scores at every position of ``feats`` [B, T, H] (or logits, when ``head`` is None).

    targets [B, T] sampled ids (negative = none); support_ids [B, T, K]; topk: how many of the
    model's own top ids to return; vocab_rows: logits past this row (tokenizer padding rows) are
    excluded from everything; block: positions per block (None = all at once); buckets [V]
    long: a partition of the ids into n_buckets bins whose log-probabilities are returned as
    Scores.byte_logprobs (the first-byte marginal).

    Without gradients (the teacher, the student's old log-probs and own top-k) every quantity comes
    from one pass over each block's logits (``_head_stats``); with gradients (the student's naive
    path) the quantities are differentiable functions of the logits.
    """
    if not torch.is_grad_enabled() or not (feats.requires_grad or (head is not None and head.weight.requires_grad)):
        with torch.no_grad():
            return _head_stats(feats, head, targets, temperature, support_ids, topk, entropy, vocab_rows,
                               block, buckets, n_buckets)
    B, T = targets.shape
    f, sup = feats.reshape(B * T, feats.shape[-1]), _flat_support(support_ids, B * T)
    acc = _Blocks(B, T, f, sup, topk, entropy, buckets is not None, n_buckets)
    for logits, tgt, sup_c in _block_logits(f, head, targets, sup, temperature, vocab_rows, block):
        z = torch.logsumexp(logits, dim=-1)
        acc.lse.append(z)
        acc.tok.append(logits.gather(1, tgt[:, None]).squeeze(1) - z)
        acc.support_and_topk(logits, sup_c)
        if buckets is not None:
            acc.bk.append(bucket_logsumexp(logits, buckets, n_buckets) - z.unsqueeze(-1))
        if entropy:  # a diagnostic: no graph is kept for it; H = lse - Σ p z
            with torch.no_grad():
                p = torch.softmax(logits, -1)
                acc.ent.append(z.detach() - (p * logits).sum(-1))
                del p
    return acc.scores()


class _Blocks:
    """The per-block pieces of one head pass (sampled-token log-probs, log-sum-exp, support logits,
    top-k ids and logits, entropy, bucket log-probs), joined into Scores [B, T, ...] at the end."""

    def __init__(self, B: int, T: int, like: Tensor, sup: Tensor | None, topk: int, entropy: bool, buckets: bool,
                 n_buckets: int) -> None:
        self.B, self.T, self.like, self.sup, self.topk = B, T, like, sup, topk
        self.entropy, self.buckets, self.n_buckets = entropy, buckets, n_buckets
        self.tok: list[Tensor] = []
        self.lse: list[Tensor] = []
        self.sl: list[Tensor] = []
        self.ti: list[Tensor] = []
        self.tl: list[Tensor] = []
        self.ent: list[Tensor] = []
        self.bk: list[Tensor] = []

    def support_and_topk(self, logits: Tensor, sup: Tensor | None) -> Tensor | None:
        """Keep one block's logits on the support ids and its top-k (ids, logits); returns the top-k
        logits (largest first) or None."""
        if sup is not None:
            self.sl.append(logits.gather(1, sup))
        if not self.topk:
            return None
        v, i = logits.topk(self.topk, dim=-1)
        self.ti.append(i)
        self.tl.append(v)
        return v

    def scores(self) -> Scores:
        def cat(xs: list[Tensor], *tail: int) -> Tensor:
            return torch.cat(xs).reshape(self.B, self.T, *tail) if xs else self.like.new_zeros(self.B, self.T, *tail)
        return Scores(
            token_logprob=cat(self.tok),
            lse=cat(self.lse),
            support_logits=cat(self.sl, self.sup.shape[-1]) if self.sup is not None else None,
            topk_ids=cat(self.ti, self.topk) if self.topk else None,
            topk_logits=cat(self.tl, self.topk) if self.topk else None,
            entropy=cat(self.ent) if self.entropy else None,
            byte_logprobs=cat(self.bk, self.n_buckets) if self.buckets else None,
        )


def _head_stats(feats: Tensor, head: nn.Linear | None, targets: Tensor, temperature: float,
                support_ids: Tensor | None, topk: int, entropy: bool, vocab_rows: int | None,
                block: int | None, buckets: Tensor | None, n_buckets: int) -> Scores:
    """head_scores without gradients, one pass per block: the logits z once; the maximum from the
    top-k (or one max); e = exp(z - max) once; lse, entropy (log Σe − Σ e·(z − max) / Σe) and the
    bucket sums from e."""
    B, T = targets.shape
    f, sup = feats.reshape(B * T, feats.shape[-1]), _flat_support(support_ids, B * T)
    acc = _Blocks(B, T, f, sup, topk, entropy, buckets is not None, n_buckets)
    for z, tgt, sup_c in _block_logits(f, head, targets, sup, temperature, vocab_rows, block):
        if head is None or z.data_ptr() == f.data_ptr():
            z = z.clone()  # the caller's logits are not ours to change in place
        tok_logit = z.gather(1, tgt[:, None]).squeeze(1)
        top = acc.support_and_topk(z, sup_c)
        m = top[:, :1] if top is not None else z.amax(-1, keepdim=True)
        z = z.sub_(m)  # z - max, in place
        tot, dot, sums = exp_stats(z, entropy, buckets, n_buckets)
        z_lse = tot.log() + m.squeeze(1)
        acc.lse.append(z_lse)
        acc.tok.append(tok_logit - z_lse)
        if entropy:
            acc.ent.append(tot.log() - dot / tot)
        if sums is not None:
            acc.bk.append(sums.div_(tot.unsqueeze(1)).log_())
        del z
    return acc.scores()


def exp_stats(s: Tensor, dot: bool, buckets: Tensor | None, n_buckets: int,
              rows: int = 32) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """From shifted logits s [n, V] (s = z - max): Σ_v e^s, Σ_v e^s·s (when ``dot``) and the
    per-bucket sums of e^s [n, n_buckets] (when ``buckets``), computing e^s for ``rows`` rows at a
    time, so the only [n, V] tensor is ``s`` itself."""
    n = s.shape[0]
    tot = s.new_empty(n)
    dots = s.new_empty(n) if dot else None
    sums = s.new_zeros(n, n_buckets) if buckets is not None else None
    for r in range(0, n, rows):
        e = s[r : r + rows].exp()
        tot[r : r + rows] = e.sum(-1)
        if dots is not None:
            dots[r : r + rows] = torch.linalg.vecdot(e, s[r : r + rows])
        if sums is not None:
            sums[r : r + rows].index_add_(1, buckets[: s.shape[1]], e)
        del e
    return tot, dots, sums


def lookup_logits(ids: Tensor, cand_ids: Tensor, cand_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Logits of ``ids`` [B, T, K] read from candidates [B, T, C] (ids and their logits, from a pass
    already made): (logits [B, T, K], found [B, T, K] bool; logits are 0 where not found)."""
    eq = ids.unsqueeze(-1) == cand_ids.unsqueeze(-2)  # [B, T, K, C]
    found = eq.any(-1)
    first = eq.to(torch.uint8).argmax(-1)
    return torch.where(found, cand_logits.gather(-1, first), torch.zeros((), dtype=cand_logits.dtype,
                                                                           device=cand_logits.device)), found
