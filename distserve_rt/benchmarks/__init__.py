"""Benchmark cases and result records shared by `drt-run bench-ops` and `bench/`."""
