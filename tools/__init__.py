"""Off the product floor: benchmarks (``python -m tools.benchmark``, ``python -m tools.bench_store``)."""
