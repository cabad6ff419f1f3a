"""Benchmarks: each module measures one path against baselines run in the same process."""
