"""Each registered benchmark as a pytest-benchmark test (parametrised in conftest.py).

The provider is built and parity-checked exactly as the command does (runner.CaseRun.trial), then timed by
pytest-benchmark over the rotating input sets; on a GPU each timed call ends with torch.cuda.synchronize(), so
the host clock measures finished GPU work. extra_info records the FLOP / byte / item counts per call, from
which TFLOP/s, GB/s or items/s follow.
"""
import gc
import time

import pytest
import torch

from benchmarks import report, runner

_runs = {}  # the CaseRun of the case being tested (consecutive tests share it; one kept at a time)


def _case_run(bench, case, device):
    key = (bench.name, repr(case), device)
    if key not in _runs:
        _runs.clear()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        _runs[key] = runner.CaseRun(bench, case, device)
    return _runs[key]


def test_benchmark(benchmark, bench_case):
    bench, case, provider, device = bench_case
    reason = bench.available()
    if reason:
        pytest.skip(reason)
    run = _case_run(bench, case, device)
    trial = run.trial(provider)
    if trial.status == "n/a" or (trial.status == "failed" and not provider.name.startswith(report.OURS)):
        pytest.skip(f"{provider.name}: {trial.status}: {trial.note}")
    assert trial.status == "ok", f"{provider.name}: {trial.status}: {trial.note}"

    call = run.caller(trial.fn)
    if device == "cuda":
        def step():
            call()
            torch.cuda.synchronize()
    else:
        step = call
    t0 = time.perf_counter()
    step()
    once = time.perf_counter() - t0
    benchmark.extra_info.update(
        benchmark=bench.name, case=bench.label(case), provider=provider.name, device=device,
        flops=bench.flops(case) if bench.flops else None,
        bytes=bench.bytes(case, run.dtype.itemsize) if bench.bytes else None,
        items=bench.items(case) if bench.items else None, parity_err=trial.parity_err)
    benchmark.pedantic(step, rounds=max(3, min(200, int(0.5 / max(once, 1e-6)))), warmup_rounds=1, iterations=1)
