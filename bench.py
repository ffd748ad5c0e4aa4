"""Benchmarks: ``python bench.py align`` (see ``python bench.py --help``)."""

import sys

from opdlm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
