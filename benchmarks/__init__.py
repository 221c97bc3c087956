"""Benchmarks: load generator, model micro-benchmarks, GPU suite (results under results/)."""
