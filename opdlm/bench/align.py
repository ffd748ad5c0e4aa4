"""Alignment throughput of the byte_span aligner on real tokenizers, one CPU thread.

For each direction (student -> teacher) it encodes a generated mixed corpus with the student
tokenizer (the "sampled" ids, end of turn appended), then times ``align_rows``: student bytes from
ids, UTF-8 validation, the teacher's re-tokenisation and the chunking. It reports student tokens per
second for the whole, the share spent in re-tokenisation, and the alignment statistics (one-to-one,
top-K-eligible, mismatched, tokens per chunk) on the mixed corpus and on number-heavy text.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerFast

from opdlm.xtok.align import align_rows, teacher_encoder
from opdlm.xtok.corpus import mixed_corpus
from opdlm.xtok.tables import pair_tables

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: no rayon pool
os.environ["RAYON_NUM_THREADS"] = "1"


def _stats(rows: list, res: list, tables: Any) -> dict[str, float]:
    n = sum(len(r) for r in rows)
    one = same = mism = chunks = aligned = 0
    for ids, r in zip(rows, res):
        aligned += int((r.student_chunk >= 0).sum())
        chunks += len(r.chunk_equal)
        _, o2o, eligible, mismatched = r.token_flags(tables.safe[ids])
        one += int(o2o.sum())
        same += int(eligible.sum())
        mism += int(mismatched.sum())
    return {"one_to_one": one / n, "topk_eligible": same / n, "unaligned": 1 - aligned / n,
            "mismatched": mism / n, "tokens_per_chunk": aligned / max(1, chunks)}


def run(args: Any) -> None:


    toks = {
        "qwen": PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.qwen, "tokenizer.json"),
                                        eos_token="<|im_end|>"),
        "llama": PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.llama, "tokenizer.json"),
                                         eos_token="<|eot_id|>"),
    }
    rows_of = {"qwen": 151936, "llama": 128256}
    corpus = mixed_corpus(args.texts, seed=args.seed)
    numbers = [" ".join(str(x) for x in np.random.default_rng(i).integers(0, 10**9, 40)) for i in range(200)]
    print(f"corpus: {len(corpus)} mixed texts ({sum(len(x.encode()) for x in corpus) / 1e6:.2f} MB), "
          f"one thread, {args.repeats} timed passes (best kept)")
    print()
    print("| student -> teacher | student tokens | tables (s, once) | tokens/s (all) | re-tokenisation share "
          "| one-to-one | top-K eligible | mismatched | tokens/chunk | numbers: one-to-one | numbers: eligible |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s, t in (("llama", "qwen"), ("qwen", "llama")):
        st, tt = toks[s], toks[t]
        t0 = time.perf_counter()
        tables = pair_tables(st, tt, rows_of[s], rows_of[t])
        enc = teacher_encoder(tt)
        build = time.perf_counter() - t0
        rows = [np.asarray(st(x, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                           + [st.eos_token_id]) for x in corpus]
        n = sum(len(r) for r in rows)
        texts = list(corpus)
        best = best_tok = float("inf")
        res = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = align_rows(rows, tables, enc)
            best = min(best, time.perf_counter() - t0)
            t0 = time.perf_counter()
            enc.encode_batch(texts, add_special_tokens=False)
            best_tok = min(best_tok, time.perf_counter() - t0)
        st_all = _stats(rows, res, tables)
        num_rows = [np.asarray(st(x, add_special_tokens=False)["input_ids"]) for x in numbers]
        st_num = _stats(num_rows, align_rows(num_rows, tables, enc), tables)
        print(f"| {s} -> {t} | {n:,} | {build:.1f} | {n / best:,.0f} | {best_tok / best:.0%} "
              f"| {st_all['one_to_one']:.1%} | {st_all['topk_eligible']:.1%} | {st_all['mismatched']:.2%} "
              f"| {st_all['tokens_per_chunk']:.2f} | {st_num['one_to_one']:.1%} | {st_num['topk_eligible']:.1%} |")
    print()
    print("target: >= 200,000 student tokens/s including teacher re-tokenisation (one thread)")
