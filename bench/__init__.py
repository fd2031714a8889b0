"""Benchmarks of issue 6: `python bench/run_all.py` (see BENCHMARKS.md). Not part of the installed package."""
