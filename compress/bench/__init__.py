"""Benchmarking, a product feature: variants compared on identical seeds, reports and Pareto plots.

``dit-compress bench`` and ``dit-compress demo`` call this package; the scripts under ``benchmarks/``
drive it to produce the committed results.
"""

from compress.bench.harness import BenchConfig, Variant, run_bench
from compress.bench.suite import SuiteSpec, VariantSpec, load_suite, variant_from_source

__all__ = ["BenchConfig", "SuiteSpec", "Variant", "VariantSpec", "load_suite", "run_bench", "variant_from_source"]
