"""Benchmarks: the gateway measured against the machine's own limit (docs/performance.md)."""
