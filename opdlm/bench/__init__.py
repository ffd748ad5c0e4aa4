"""Benchmarks (python bench.py --help)."""
