"""Turn a model's hidden states at response positions into the quantities losses consume
(sampled-token log-probs, log-sum-exp, logits gathered on a support, the model's own top-k,
entropy), so that no loss ever touches a [B, T, V] tensor itself.

``head_scores`` walks the positions in blocks: under ``torch.no_grad`` (the teacher) the full
logits exist for one block at a time; with gradients (the student, naive path) each block's logits
stay alive for backward, which is what the memory-lean path replaces.
"""

from __future__ import annotations

import dataclasses

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


def matmul_dtype(device_type: str, weight: Tensor) -> torch.dtype:
    """The dtype a head's matmul runs in: autocast's when it is on, else the weight's."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class Scratch:
    """One reusable [block, rows] tensor for the blocks of logits of one pass. On the CPU a fresh
    tensor of that size pays its page faults each time (large blocks go back to the system when
    freed), which costs a third of a small head's matmul; the blocks of a pass write into the same
    memory instead."""

    def __init__(self) -> None:
        self.t: Tensor | None = None

    def get(self, n: int, rows: int, like: Tensor, dtype: torch.dtype) -> Tensor:
        """A [n, rows] view of the scratch tensor (made or grown as needed)."""
        t = self.t
        if t is None or t.shape[0] < n or t.shape[1] != rows or t.dtype != dtype or t.device != like.device:
            t = self.t = torch.empty(n, rows, dtype=dtype, device=like.device)
        return t[:n]


def linear_logits(h: Tensor, weight: Tensor, bias: Tensor | None, rows: int, temperature: float,
                  dtype: torch.dtype, scratch: Scratch | None = None) -> Tensor:
    """fp32 (at least) logits [n, rows] of hidden states h [n, H] through a linear head (its first
    ``rows`` rows), divided by the temperature; written into ``scratch`` when the matmul's dtype is
    the logits' dtype (fp32, fp64). Autocast is off inside: the matmul runs in ``dtype``."""
    w = weight[:rows]
    b = bias[:rows] if bias is not None else None
    with torch.autocast(h.device.type, enabled=False):
        hd, wd, bd = h.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None
        if scratch is not None and dtype in (torch.float32, torch.float64):
            out = scratch.get(h.shape[0], rows, h, dtype)
            z = torch.addmm(bd, hd, wd.t(), out=out) if bd is not None else torch.mm(hd, wd.t(), out=out)
        else:
            z = nn.functional.linear(hd, wd, bd)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    if temperature != 1.0:
        z = z.div_(temperature)
    return z


def _logits(feats: Tensor, head: nn.Linear | None, temperature: float, rows: int | None = None,
            scratch: Scratch | None = None) -> Tensor:
    """A block's logits (over the first ``rows`` rows) divided by the temperature, fp32 at least.
    Without gradients a plain nn.Linear head writes into ``scratch``; any other head (a subclass
    may compute differently) runs its own forward."""
    if head is not None and scratch is not None and type(head) is nn.Linear and not torch.is_grad_enabled():
        return linear_logits(feats, head.weight, head.bias, min(rows or head.out_features, head.out_features),
                             temperature, matmul_dtype(feats.device.type, head.weight), scratch)
    logits = feats if head is None else head(feats)
    if rows is not None and rows < logits.shape[-1]:
        logits = logits[:, :rows]
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
    scratch = Scratch() if n > step else None  # several blocks share one tensor
    for s in range(0, n, step):
        logits = _logits(f[s : s + step], head, temperature, vocab_rows, scratch)
        yield logits, tgt[s : s + step], (sup[s : s + step] if sup is not None else None)


def head_scores(feats: Tensor, head: nn.Linear | None, targets: Tensor, *, temperature: float = 1.0,
                support_ids: Tensor | None = None, topk: int = 0, entropy: bool = True,
                vocab_rows: int | None = None, block: int | None = None,
                buckets: Tensor | None = None, n_buckets: int = 0, keep_logits: int = 0) -> Scores:
    """Scores at every position of ``feats`` [B, T, H] (or logits, when ``head`` is None).

    targets [B, T] sampled ids (negative = none); support_ids [B, T, K]; topk: how many of the
    model's own top ids to return; vocab_rows: logits past this row (tokenizer padding rows) are
    excluded from everything; block: positions per block (None = all at once); buckets [V]
    long: a partition of the ids into n_buckets bins whose log-probabilities are returned as
    Scores.byte_logprobs (the first-byte marginal); keep_logits: return the logits of the first
    ``keep_logits`` ids themselves as Scores.support_logits (a full-vocabulary loss's support, in
    place of ``support_ids``).

    Without gradients (the teacher, the student's old log-probs and own top-k) every quantity comes
    from one pass over each block's logits (``_head_stats``); with gradients (the student's naive
    path) the quantities are differentiable functions of the logits.
    """
    if not torch.is_grad_enabled() or not (feats.requires_grad or (head is not None and head.weight.requires_grad)):
        with torch.no_grad():
            return _head_stats(feats, head, targets, temperature, support_ids, topk, entropy, vocab_rows,
                               block, buckets, n_buckets, keep_logits)
    B, T = targets.shape
    f, sup = feats.reshape(B * T, feats.shape[-1]), _flat_support(support_ids, B * T)
    acc = _Blocks(B, T, f, sup, topk, entropy, buckets is not None, n_buckets, keep_logits)
    for logits, tgt, sup_c in _block_logits(f, head, targets, sup, temperature, vocab_rows, block):
        z = torch.logsumexp(logits, dim=-1)
        acc.lse.append(z)
        acc.tok.append(logits.gather(1, tgt[:, None]).squeeze(1) - z)
        acc.support_and_topk(logits, sup_c)
        if keep_logits:
            acc.sl.append(logits[:, :keep_logits])
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
                 n_buckets: int, keep: int = 0) -> None:
        self.B, self.T, self.like, self.sup, self.topk = B, T, like, sup, topk
        self.width = sup.shape[-1] if sup is not None else keep  # support_logits' width (0: none)
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
        v, i = grouped_topk(logits, self.topk)
        self.ti.append(i)
        self.tl.append(v)
        return v

    def scores(self) -> Scores:
        def cat(xs: list[Tensor], *tail: int) -> Tensor:
            return torch.cat(xs).reshape(self.B, self.T, *tail) if xs else self.like.new_zeros(self.B, self.T, *tail)
        return Scores(
            token_logprob=cat(self.tok),
            lse=cat(self.lse),
            support_logits=cat(self.sl, self.width) if self.width else None,
            topk_ids=cat(self.ti, self.topk) if self.topk else None,
            topk_logits=cat(self.tl, self.topk) if self.topk else None,
            entropy=cat(self.ent) if self.entropy else None,
            byte_logprobs=cat(self.bk, self.n_buckets) if self.buckets else None,
        )


def _head_stats(feats: Tensor, head: nn.Linear | None, targets: Tensor, temperature: float,
                support_ids: Tensor | None, topk: int, entropy: bool, vocab_rows: int | None,
                block: int | None, buckets: Tensor | None, n_buckets: int, keep_logits: int = 0) -> Scores:
    """head_scores without gradients, one pass per block: the logits z once; the maximum from the
    top-k (or one max); e = exp(z - max) once; lse, entropy (log Σe − Σ e·(z − max) / Σe) and the
    bucket sums from e."""
    B, T = targets.shape
    f, sup = feats.reshape(B * T, feats.shape[-1]), _flat_support(support_ids, B * T)
    acc = _Blocks(B, T, f, sup, topk, entropy, buckets is not None, n_buckets)
    kept, at = None, 0  # the logits themselves (keep_logits), written block by block into one tensor
    for z, tgt, sup_c in _block_logits(f, head, targets, sup, temperature, vocab_rows, block):
        tok_logit = z.gather(1, tgt[:, None]).squeeze(1)
        top = acc.support_and_topk(z, sup_c)
        if keep_logits:
            kept = z.new_empty(B * T, keep_logits) if kept is None else kept
            kept[at : at + z.shape[0]] = z[:, :keep_logits]
        at += z.shape[0]
        m = top[:, :1] if top is not None else z.amax(-1, keepdim=True)
        tot, dot, sums = exp_stats(z, m, entropy, buckets, n_buckets)
        z_lse = tot.log() + m.squeeze(1)
        acc.lse.append(z_lse)
        acc.tok.append(tok_logit - z_lse)
        if entropy:
            acc.ent.append(tot.log() - dot / tot)
        if sums is not None:
            acc.bk.append(sums.div_(tot.unsqueeze(1)).log_())
        del z
    if kept is not None:
        return dataclasses.replace(acc.scores(), support_logits=kept.reshape(B, T, keep_logits))
    return acc.scores()


def exp_stats(z: Tensor, m: Tensor, dot: bool, buckets: Tensor | None, n_buckets: int,
              rows: int = 16) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """From logits z [n, V] and their row maxima m [n, 1], with s = z - m: Σ_v e^s, Σ_v e^s·s (when
    ``dot``) and the per-bucket sums of e^s [n, n_buckets] (when ``buckets``). s and e^s exist for
    ``rows`` rows at a time (small enough to stay in the CPU's cache), so z is read once and
    never written."""
    n = z.shape[0]
    tot = z.new_empty(n)
    dots = z.new_empty(n) if dot else None
    sums = z.new_zeros(n, n_buckets) if buckets is not None else None
    for r in range(0, n, rows):
        sh = z[r : r + rows] - m[r : r + rows]
        e = sh.exp()
        tot[r : r + rows] = e.sum(-1)
        if dots is not None:
            dots[r : r + rows] = torch.linalg.vecdot(e, sh)
        if sums is not None:
            sums[r : r + rows].index_add_(1, buckets[: z.shape[1]], e)
        del e, sh
    return tot, dots, sums


def grouped_topk(z: Tensor, k: int, group: int = 128) -> tuple[Tensor, Tensor]:
    """torch.topk(z, k) over the last axis of z [n, V] (values largest first, and their ids), read in
    one pass: the maximum of each group of ``group`` ids, the k groups with the largest maxima
    (every id of the top k lies in one of them), then the top k of those k·group candidates."""
    n, V = z.shape
    if k * group * 4 > V:  # too few groups to save anything
        return z.topk(k, dim=-1)
    whole = V // group * group
    maxima = z[:, :whole].reshape(n, V // group, group).amax(-1)
    if whole < V:
        maxima = torch.cat([maxima, z[:, whole:].amax(-1, keepdim=True)], 1)
    _, g = maxima.topk(k, dim=-1)
    cols = (g.unsqueeze(-1) * group + torch.arange(group, device=z.device)).reshape(n, k * group)
    inside = cols < V
    cand = z.gather(1, cols.clamp_max(V - 1))
    if not bool(inside.all()):
        cand = cand.masked_fill(~inside, float("-inf"))
    v, j = cand.topk(k, dim=-1)
    return v, cols.gather(1, j)


def lookup_logits(ids: Tensor, cand_ids: Tensor, cand_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Logits of ``ids`` [B, T, K] read from candidates [B, T, C] (ids and their logits, from a pass
    already made): (logits [B, T, K], found [B, T, K] bool; logits are 0 where not found)."""
    eq = ids.unsqueeze(-1) == cand_ids.unsqueeze(-2)  # [B, T, K, C]
    found = eq.any(-1)
    first = eq.to(torch.uint8).argmax(-1)
    return torch.where(found, cand_logits.gather(-1, first), torch.zeros((), dtype=cand_logits.dtype,
                                                                           device=cand_logits.device)), found
