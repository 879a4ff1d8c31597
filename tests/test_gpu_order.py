"""The order of the GPU test set under the GPU check's time cap (tests/conftest.py)."""
from types import SimpleNamespace

import pytest

from tests import conftest


def test_gpu_tests_of_the_kernels_in_use_run_first():
    ids = ["tests/kernels/test_exp2_asm.py::a", "tests/kernels/test_linear_act.py::b", "tests/kernels/test_rope.py::c",
           "tests/models/test_gpu.py::d", "tests/kernels/test_attention.py::e", "tests/kernels/test_layer_norm.py::f",
           "tests/kernels/test_window_attention.py::g", "tests/kernels/test_attention.py::h"]
    items = sorted((SimpleNamespace(nodeid=i) for i in ids), key=conftest._gpu_rank)
    assert [i.nodeid[-1] for i in items] == ["e", "g", "h", "c", "f", "d", "a", "b"]


def test_time_budget():
    assert not conftest.budget_spent(now=conftest._T0 + 1e6, budget=0)  # no budget: never spent
    assert not conftest.budget_spent(now=conftest._T0 + 100, budget=160)
    assert conftest.budget_spent(now=conftest._T0 + 161, budget=160)


def test_gpu_test_workers(monkeypatch):
    monkeypatch.setattr(conftest, "gpu_takes_several_processes", lambda: True)
    workers = conftest.gpu_test_workers
    assert workers("gpu", 16, cuda=True, gpu_check=True, env={}) == 8  # the GPU check's 16 cores
    assert workers("gpu", 6, cuda=True, gpu_check=True, env={}) == 3
    assert workers("gpu", 2, cuda=True, gpu_check=True, env={}) == 0  # one worker: no xdist at all
    assert workers("gpu", 16, cuda=True, gpu_check=False, env={}) == 0  # elsewhere only when asked for
    assert workers("gpu", 16, cuda=True, gpu_check=False, env={"DLCV_GPU_TEST_WORKERS": "4"}) == 4
    assert workers("gpu", 16, cuda=True, gpu_check=True, env={"DLCV_GPU_TEST_WORKERS": "0"}) == 0
    assert workers("gpu", 16, cuda=False, gpu_check=True, env={"DLCV_GPU_TEST_WORKERS": "4"}) == 0  # no CUDA
    assert workers("", 16, cuda=True, gpu_check=True, env={}) == 0  # not the GPU set
    assert workers("not gpu", 16, cuda=True, gpu_check=True, env={}) == 0
    assert workers("gpu and not slow", 16, cuda=True, gpu_check=True, env={}) == 8
    assert workers("not (slow or gpu)", 16, cuda=True, gpu_check=True, env={}) == 0  # by meaning, not by text
    assert workers("gpux", 16, cuda=True, gpu_check=True, env={}) == 0
    monkeypatch.setattr(conftest, "gpu_takes_several_processes", lambda: False)  # an Exclusive_Process GPU
    assert workers("gpu", 16, cuda=True, gpu_check=True, env={}) == 0
    with pytest.raises(pytest.UsageError, match="DLCV_GPU_TEST_WORKERS"):
        workers("gpu", 16, cuda=True, gpu_check=True, env={"DLCV_GPU_TEST_WORKERS": "many"})


def test_gpu_check_starts_xdist_workers(monkeypatch):
    """The hook sets what `-n 8` would (xdist's own hook, which runs after it, then spawns the workers)."""
    monkeypatch.setattr(conftest, "_HAS_CUDA", True)
    monkeypatch.setattr(conftest, "_GPU_CHECK", True)
    monkeypatch.setattr(conftest, "_IN_WORKER", False)
    monkeypatch.setattr(conftest.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(conftest, "gpu_takes_several_processes", lambda: True)
    for name in ("TORCHINDUCTOR_COMPILE_THREADS", "DLCV_GPU_TEST_WORKERS"):  # restored (or removed) afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)

    def config(**option):
        return SimpleNamespace(option=SimpleNamespace(**{"markexpr": "gpu", "dist": "no", "tx": [], "usepdb": False,
                                                         "trace": False, **option}))

    c = config(numprocesses=None)
    conftest.pytest_cmdline_main(c)
    assert (c.option.numprocesses, c.option.dist, c.option.tx) == (8, "load", ["popen"] * 8)
    assert conftest.os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "2"
    c = config(numprocesses=0)  # -n 0 on the command line
    conftest.pytest_cmdline_main(c)
    assert c.option.numprocesses == 0 and c.option.tx == []
    c = config()  # xdist not installed or -p no:xdist: no such option
    conftest.pytest_cmdline_main(c)
    assert not hasattr(c.option, "numprocesses")
    c = config(numprocesses=None, markexpr="")  # the whole suite: as before
    conftest.pytest_cmdline_main(c)
    assert c.option.numprocesses is None
    for debug in (dict(usepdb=True), dict(trace=True), dict(tx=["ssh=host"])):  # --pdb, --trace, the user's --tx
        c = config(numprocesses=None, **debug)
        conftest.pytest_cmdline_main(c)
        assert c.option.numprocesses is None


def test_gpu_set_runs_on_xdist_workers_end_to_end(tmp_path):
    """`pytest -m gpu` where CUDA is present (faked here by a plugin) and workers are asked for: xdist starts
    them through the hook, each reads the controller's start time for the budget, the controller prints the
    per-test lines."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "fake_cuda.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_XDIST", "DLCV_", "TRITON_INTERPRET", "PYTEST_ADDOPTS"))}
    env.update(PYTHONPATH=str(tmp_path), DLCV_GPU_TEST_WORKERS="2")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-p", "fake_cuda", "-m", "gpu or not gpu", "-v", "-p", "no:cacheprovider",
           "tests/test_gpu_order.py::test_time_budget", "tests/test_gpu_order.py::test_gpu_test_workers"]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[gw0]" in run.stdout and "[gw1]" in run.stdout  # two workers ran them
    assert "call     passed" in run.stdout and "2 passed" in run.stdout  # the controller's per-test lines
    env["DLCV_GPU_TEST_BUDGET_S"] = "0.001"  # spent before any worker starts a test
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "2 skipped" in run.stdout and "time budget of 0 s spent" in run.stdout, run.stdout
