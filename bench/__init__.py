"""Benchmarks of the blockem workflow (see bench/README.md); `python -m bench` runs them all."""
