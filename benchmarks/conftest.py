"""pytest-benchmark tests of the benchmark registry: ``pytest benchmarks/ --benchmark-only``.

One test per (benchmark, case, provider) of the same registry that ``python -m benchmarks`` runs: headline
shapes by default (the command's ``--quick`` cases), all shapes with ``--bench-full``; on the CPU, the tiny
CPU shapes. The repository's plain ``pytest`` run does not collect this folder (pytest.ini: testpaths = tests).
"""
import pytest

from benchmarks import registry, runner


def pytest_addoption(parser):
    group = parser.getgroup("dlcv_fast benchmarks")
    group.addoption("--bench-full", action="store_true",
                    help="every shape of each benchmark (default: the headline shapes)")
    group.addoption("--bench-device", choices=("auto", "cuda", "cpu"), default="auto", help="device to benchmark on")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    device = runner.pick_device(metafunc.config.getoption("--bench-device"))
    quick = not metafunc.config.getoption("--bench-full")
    params = []
    for bench in registry.benchmarks():
        for case in bench.cases_for(device, quick):
            for provider in bench.providers_for(device):
                case_id = bench.label(case).replace(" ", ",")
                params.append(pytest.param((bench, case, provider, device),
                                           id=f"{bench.name}[{case_id}]-{provider.name}"))
    metafunc.parametrize("bench_case", params)
