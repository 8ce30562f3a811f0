"""Benchmarks of bnjax against Flax and naive references (see BENCHMARKS.md)."""
