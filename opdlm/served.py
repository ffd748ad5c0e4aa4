"""A teacher behind a server: the teacher's scores read from a vLLM OpenAI-compatible server
(``teacher.server``), so that no teacher weights sit in the training processes.

What a server returns for a sequence it is given (``/v1/completions`` with ``prompt_logprobs``): at
every position its top-K ids with their log-probs, and the log-prob of the token actually there.
That is exactly what top-K support matching reads: the support's teacher logits are the top-K
log-probs (a constant away from the logits, which renormalising over the support cancels), the
sampled token's log-prob is the position's own, the log-sum-exp is 0 in those units, and the top-K
probability mass is the sum of their probabilities. What it cannot give: the teacher's entropy,
its hidden states, its logits on ids outside its top-K (a student's top-K), its first-byte
marginals or its whole vocabulary; a loss or support that reads those is refused at ``--check``
(``check_served``).

Rows are sent in batches of ``batch_rows`` prompts per request, ``max_in_flight`` requests at
once. A request that fails (connection refused, time-out, a server error) is retried
``retries`` times with a doubling wait; then the step stops (ServedTeacherError) and the run can
continue from its checkpoint. A response with fewer than K log-probs at a position, with the wrong
number of positions, or without the sequence's own token, is an error, never read.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from opdlm.errors import ConfigError
from opdlm.types import Scores, TeacherView

#: the teacher's Scores fields a server provides (opdlm.reads names)
SERVED_FIELDS = frozenset({"token_logprob", "lse", "topk_ids", "topk_logits", "support_logits"})
#: the probe texts whose tokenization the server and the configured tokenizer must agree on
PROBES = ("The quick brown fox jumps over 13 lazy dogs.", "3+9-8+5=", "  indented\n\tand tabs; ünïcödé ✓")


class ServedTeacherError(RuntimeError):
    """The teacher's server could not score a step after its retries; one line naming it."""


class TeacherServer:
    """A client of one vLLM OpenAI-compatible server holding the teacher (a ``teacher.server`` node)."""

    def __init__(self, node: Mapping[str, Any], key: str = "teacher.server") -> None:
        self.url = str(node["url"]).rstrip("/")
        self.model, self.top_k = node["model"], int(node["top_k"])
        self.timeout, self.in_flight = float(node["timeout_s"]), int(node["max_in_flight"])
        self.retries, self.rows = int(node["retries"]), int(node["batch_rows"])
        self.key = key
        self.stats = {"requests": 0, "bytes_sent": 0, "bytes_received": 0, "retried": 0, "seconds": 0.0}

    # -- the wire ---------------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any] | None, timeout: float | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
            raw = resp.read()
        self.stats["requests"] += 1
        self.stats["bytes_sent"] += len(data or b"")
        self.stats["bytes_received"] += len(raw)
        return json.loads(raw)

    def _with_retries(self, what: str, call: Any) -> Any:
        wait = 1.0
        for attempt in range(self.retries + 1):
            try:
                return call()
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                if isinstance(e, urllib.error.HTTPError) and e.code < 500:  # a bad request: retrying cannot help
                    raise ServedTeacherError(f"{self.key}: {self.url} refused {what}: HTTP {e.code}: "
                                             f"{_detail(e)}") from None
                if attempt == self.retries:
                    raise ServedTeacherError(f"{self.key}: {self.url} did not answer {what} after {self.retries + 1} "
                                             f"tries ({_reason(e)})") from None
                self.stats["retried"] += 1
                time.sleep(wait)
                wait *= 2

    # -- what the run asks ---------------------------------------------------------------------------
    def probe(self, tokenizer: Any) -> int | None:
        """Before any training: the server answers, serves ``model``, tokenizes as ``tokenizer`` does,
        and returns ``top_k`` log-probs per position (its --max-logprobs allows it). ConfigError (one
        line) otherwise. Returns the served model's max_model_len (None when the server does not say)."""
        try:
            models = self._post("/v1/models", None, timeout=min(self.timeout, 30.0))
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            raise ConfigError(f"{self.key}.url: cannot reach {self.url} ({_reason(e)})") from None
        cards = {m.get("id"): m for m in models.get("data", [])}
        names = list(cards)
        if self.model is None:
            if len(names) != 1:
                raise ConfigError(f"{self.key}.model: {self.url} serves {names}; name the teacher's")
            self.model = names[0]
        elif self.model not in names:
            raise ConfigError(f"{self.key}.model: {self.url} does not serve {self.model!r}; it serves {names}")
        eos = getattr(tokenizer, "eos_token", None)
        for text in (*PROBES, *([f"4{eos}"] if isinstance(eos, str) else [])):  # the end token as one id on both
            try:
                got = self._post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})["tokens"]
            except (urllib.error.URLError, KeyError, OSError) as e:
                raise ConfigError(f"{self.key}.url: {self.url}/tokenize failed ({_reason(e)})") from None
            want = tokenizer(text, add_special_tokens=False)["input_ids"]
            if list(got) != list(want):
                raise ConfigError(f"{self.key}: the server tokenizes {text!r} as {list(got)[:12]}, the teacher's "
                                  f"tokenizer (teacher.tokenizer_path) as {list(want)[:12]}: not the same teacher")
        ids = tokenizer(PROBES[0], add_special_tokens=False)["input_ids"]
        try:
            self._score_rows([ids])
        except ServedTeacherError as e:
            raise ConfigError(f"{self.key}.top_k: {e}") from None
        n = cards[self.model].get("max_model_len")
        return int(n) if n else None

    def _score_rows(self, rows: list[list[int]]) -> list[list[dict[int, float] | None]]:
        """Per row, per position: {id: log-prob} of the server's top-K and the position's own token
        (None at position 0), checked."""
        body = {"model": self.model, "prompt": rows, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.top_k, "add_special_tokens": False}
        out = self._with_retries(f"a request for {len(rows)} rows", lambda: self._post("/v1/completions", body))
        choices = sorted(out.get("choices", []), key=lambda c: c.get("index", -1))
        if [c.get("index") for c in choices] != list(range(len(rows))):
            raise ServedTeacherError(f"{self.key}: {self.url} answered choices {[c.get('index') for c in choices]} "
                                     f"for {len(rows)} rows (0 to {len(rows) - 1}, once each)")
        result = []
        for row, choice in zip(rows, choices):
            lps = choice.get("prompt_logprobs")
            if lps is None or len(lps) != len(row):
                raise ServedTeacherError(f"{self.key}: {self.url} returned {0 if lps is None else len(lps)} "
                                         f"prompt log-probs for a sequence of {len(row)} tokens")
            positions: list[dict[int, float] | None] = [None]
            for t in range(1, len(row)):
                got = lps[t] or {}
                entry = {int(i): float(v["logprob"]) for i, v in got.items()}
                # the top-K (rank <= K), plus the token there when its rank is beyond K
                top = sum(1 for v in got.values() if (v.get("rank") or 0) <= self.top_k)
                if row[t] not in entry or top < self.top_k:
                    raise ServedTeacherError(
                        f"{self.key}: {self.url} returned {top} top log-probs at position {t} (top_k is "
                        f"{self.top_k}){'' if row[t] in entry else ', without the token there'}")
                positions.append(entry)
            result.append(positions)
        return result

    def score(self, rows: list[list[int]]) -> list[list[dict[int, float] | None]]:
        """Every row's positions (_score_rows), ``batch_rows`` rows per request, ``max_in_flight``
        requests at once, in order."""
        t0 = time.perf_counter()
        batches = [rows[i:i + self.rows] for i in range(0, len(rows), self.rows)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.in_flight, len(batches)))) as pool:
            parts = list(pool.map(self._score_rows, batches))
        self.stats["seconds"] += time.perf_counter() - t0
        return [r for part in parts for r in part]


class ServedTeacher(nn.Module):
    """The teacher of a run whose teacher is served: no weights, a client. Moved and cast like a
    model (it has nothing to move); scoring goes through ``scores``."""

    def __init__(self, server: TeacherServer) -> None:
        super().__init__()
        self.server = server

    @torch.no_grad()
    def scores(self, view: TeacherView, topk: int, temperature: float) -> Scores:
        """The teacher's Scores at the student's positions of ``view`` (opdlm.scoring reads the same
        fields from an in-process teacher): token_logprob, topk_ids and topk_logits (log-probs,
        largest first), lse 0; at positions it does not score (pred_columns < 0) zeros."""
        if temperature != 1.0:
            raise ServedTeacherError(f"{self.server.key}: a served teacher scores at temperature 1, the sampler's is "
                                     f"{temperature}")
        ids, att, cols, tgt = view.input_ids.cpu(), view.attention_mask.cpu().bool(), view.pred_columns.cpu(), view.targets.cpu()
        B, T = tgt.shape
        rows, starts = [], []
        for b in range(B):
            keep = att[b].nonzero().flatten()
            start = int(keep[0]) if len(keep) else 0  # left padding
            row = ids[b, start: int(keep[-1]) + 1].tolist() if len(keep) else []
            scored = [(int(c) + 1 - start, int(y)) for c, y in zip(cols[b], tgt[b]) if c >= 0 and y >= 0]
            for p, y in sorted(scored):  # the last target follows the input (a forward pass never reads it)
                if p == len(row):
                    row.append(y)
                elif not 0 < p < len(row) or row[p] != y:
                    raise ServedTeacherError(f"{self.server.key}: row {b}: target {y} at column {p + start} is not "
                                             f"the token there; cannot score it with prompt log-probs")
            rows.append(row)
            starts.append(start)
        served = self.server.score(rows)
        tok = torch.zeros(B, T)
        top_ids = torch.zeros(B, T, topk, dtype=torch.long)
        top_lp = torch.full((B, T, topk), -9999.0)
        where = ((cols >= 0) & (tgt >= 0)).nonzero().tolist()
        if where:  # every scored position's entry, gathered in Python lists and written in one go
            bs, ts = zip(*where)
            cl, tl = cols.tolist(), tgt.tolist()
            entries = [served[b][cl[b][t] + 1 - starts[b]] for b, t in where]
            tok[bs, ts] = torch.tensor([e[tl[b][t]] for e, (b, t) in zip(entries, where)])
            best = [sorted(e.items(), key=lambda kv: -kv[1])[:topk] for e in entries]
            top_ids[bs, ts] = torch.tensor([[i for i, _ in x] for x in best])
            top_lp[bs, ts] = torch.tensor([[v for _, v in x] for x in best])
        device = view.targets.device
        return Scores(token_logprob=tok.to(device), lse=torch.zeros(B, T, device=device), topk_ids=top_ids.to(device),
                      topk_logits=top_lp.to(device))


def _reason(e: BaseException) -> str:
    r = getattr(e, "reason", None)
    return str(r if r is not None else e) or type(e).__name__


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
        msg = body.get("message") or body.get("error", {}).get("message") or body
    except (ValueError, AttributeError):
        msg = e.reason
    return " ".join(str(msg).split())[:300]


def check_served(cfg: Mapping[str, Any], loss: Any, support: Any, sampler: Any) -> None:
    """ConfigError (one line) when a run's served teacher cannot give what its loss and support read:
    fields beyond SERVED_FIELDS (entropy, hidden states, first-byte marginals, chunk log-probs), the
    whole vocabulary, logits on the student's own top-k, a support larger than the server's top_k,
    a sampler temperature other than 1 (the server scores at 1), or a teacher SFT stage."""
    server = cfg["teacher"]["server"]
    name = loss.plugin_name
    extra = sorted(set(loss.reads.teacher) - SERVED_FIELDS)
    if extra:
        raise ConfigError(f"loss '{name}' reads the teacher's {', '.join(extra)}, which a served teacher does not "
                          f"return (it returns its top-K log-probs and each token's log-prob)", key="loss.name")
    if loss.reads.vocabulary == "full":
        raise ConfigError(f"loss '{name}' compares the teacher's whole vocabulary, which a served teacher does not "
                          f"return; use a support loss (lsm, or full: false)", key="loss.name")
    if support.student_k:
        raise ConfigError(f"support '{support.plugin_name}' reads the student's own top-k, where a served teacher "
                          f"gives no logits; use a support built on the teacher's top-k", key="support.name")
    if support.teacher_k > server["top_k"]:
        raise ConfigError(f"support '{support.plugin_name}' needs the teacher's top-{support.teacher_k}, but the "
                          f"server returns {server['top_k']} (teacher.server.top_k)", key="support.name")
    if sampler.temperature != 1.0:
        raise ConfigError(f"the sampler's temperature is {sampler.temperature}, but a served teacher scores at "
                          f"temperature 1", key="sampler.temperature")
    if cfg["stages"]["teacher_sft"]["steps"]:
        raise ConfigError("a served teacher is not trained here; set stages.teacher_sft.steps=0",
                          key="stages.teacher_sft.steps")
