"""Scripts that drive the public API (compress, compress.bench, exporters) and commit benchmarks/results/."""
