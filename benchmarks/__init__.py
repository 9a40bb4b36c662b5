"""Benchmark harness, suites and committed results."""
