"""dlcv_fast's benchmark suite: ``python -m benchmarks [--suite kernels|models|all] [--quick] [--out DIR]``.

Every benchmark is defined once, as a :class:`benchmarks.registry.Benchmark` (shapes, providers, FLOP and
byte formulas, parity reference), in one module per op family (attention.py, window_attention.py, rope.py,
models.py). The command (``__main__.py``) and the pytest-benchmark tests (``test_bench.py``, run with
``pytest benchmarks/ --benchmark-only``) both read that one registry; ``runner.py`` holds what they share
(inputs, parity check, timing) and ``report.py`` the table, CSV/JSON and plots.
``python -m benchmarks.compile_report`` prints registers, spills and shared memory of the Triton kernels.
"""
