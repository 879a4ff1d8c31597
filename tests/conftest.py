"""Test-suite set-up.

Without a CUDA device the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1 must be
set before triton is imported, hence here). Tests marked ``gpu`` need a CUDA device and are skipped,
with the reason shown, where there is none (run them with ``pytest -m gpu`` on a GPU machine).
"""
import os
import time
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Triton decides per @triton.jit function, when it is defined, whether it is interpreted; triton.language's own
    # helpers (tl.sum's combine function, ...) are defined when triton is first imported. Import it now, so a test
    # that turns the interpreter off for a moment (and happens to be the first to import triton, e.g. through
    # torch.compile) cannot leave compiled helpers behind for the interpreted kernels of later tests.
    import triton.language  # noqa: F401

# torch.compile's on-disk caches (default /tmp/torchinductor_$USER) outlive a change of our ops: a cached
# joint graph keeps calling a backward op with its old arguments (seen after window_attention_bwd lost one),
# as torch keys them on the forward graph only. Each test session compiles into its own fresh folder.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dlcv_fast_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


# On a GPU the GPU check gives `pytest -m gpu` a time cap (3 minutes). Order: the CUDA kernels (never run on a GPU
# before), the attention and window-attention kernels, then the other kernels in use (files not listed), then the
# models and patched library models (slow: torch.compile warm-ups), then the kernels that are off by default (the
# fused MLP GEMM, the exp2 split), so a cap cuts the latter first.
GPU_ORDER = (("tests/csrc/", "tests/kernels/test_attention.py", "tests/kernels/test_window_attention.py"), None,
             ("tests/models/", "tests/integrations/"),
             ("tests/kernels/test_linear_act.py", "tests/kernels/test_exp2_asm.py"))


def _gpu_rank(item) -> int:
    path = item.nodeid.split("::")[0]
    for rank, prefixes in enumerate(GPU_ORDER):
        if prefixes is not None and path.startswith(prefixes):
            return rank
    return GPU_ORDER.index(None)


# The GPU check (.devcheck/run.sh, copied in by ../shared/device/prepare.sh) kills `pytest -m gpu` at 180 s,
# which would lose the summary and the JUnit file. In that checkout the tests not started within a budget are
# skipped instead, each saying so; DLCV_GPU_TEST_BUDGET_S sets the budget anywhere (0: none). The clock starts
# when the first pytest process imports this file: pytest-xdist workers (below) inherit its start time.
_IN_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if not _IN_WORKER:
    os.environ["DLCV_TEST_T0"] = repr(time.time())
_T0 = float(os.environ.get("DLCV_TEST_T0", time.time()))
_GPU_CHECK = _HAS_CUDA and (Path(__file__).resolve().parents[1] / ".devcheck" / "run.sh").exists()
GPU_TEST_BUDGET_S = float(os.environ.get("DLCV_GPU_TEST_BUDGET_S", 150 if _GPU_CHECK else 0))


def budget_spent(now=None, budget=None) -> bool:
    budget = GPU_TEST_BUDGET_S if budget is None else budget
    return budget > 0 and (time.time() if now is None else now) - _T0 > budget


def pytest_runtest_setup(item):
    if budget_spent():
        pytest.skip(f"time budget of {GPU_TEST_BUDGET_S:.0f} s spent before this test started (the GPU check "
                    "stops pytest at 180 s; DLCV_GPU_TEST_BUDGET_S=0 lifts the budget)")


# Most of a GPU test's time on a fresh machine is Triton compiling its kernel variants, one at a time per
# process (the 2026-11-27 H200 check ran 34 attention and window-attention tests in 125 s). So `pytest -m gpu`
# in the GPU check (16 cores, one GPU) runs on pytest-xdist workers that compile side by side and share the
# GPU (when its compute mode lets several processes use it): min(8, cores // 2) of them, each with its share of
# the cores for torch.compile's own compile workers.
# DLCV_GPU_TEST_WORKERS sets the count on any CUDA machine (0 or 1: one process); `-n` on the command line wins.
def selects_gpu_tests(markexpr: str) -> bool:
    """Whether ``-m markexpr`` selects a test marked ``gpu`` (and nothing else)."""
    if not markexpr:
        return False
    try:
        from _pytest.mark.expression import Expression

        return bool(Expression.compile(markexpr).evaluate(lambda name, **kwargs: name == "gpu"))
    except Exception:  # a pytest without that module, or an expression it rejects (pytest reports it itself)
        return False


def gpu_test_workers(markexpr: str, cpus: int, *, cuda: bool, gpu_check: bool, env=os.environ) -> int:
    """pytest-xdist workers to start for this run (0: none)."""
    if not cuda or not selects_gpu_tests(markexpr):
        return 0
    if "DLCV_GPU_TEST_WORKERS" in env:
        try:
            n = int(env["DLCV_GPU_TEST_WORKERS"])
        except ValueError:
            raise pytest.UsageError(f"DLCV_GPU_TEST_WORKERS must be a whole number of workers, got "
                                    f"{env['DLCV_GPU_TEST_WORKERS']!r}") from None
    else:
        n = min(8, cpus // 2) if gpu_check and gpu_takes_several_processes() else 0
    return n if n >= 2 else 0


def gpu_takes_several_processes() -> bool:
    """Whether the GPU's compute mode lets the workers share it (see benchmarks/warm.py)."""
    from benchmarks.warm import gpu_takes_several_processes as shared

    return shared()


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Start the GPU set's workers (see :func:`gpu_test_workers`) unless xdist is missing, turned off, or told
    otherwise on the command line; runs before xdist's own hook, which then spawns them."""
    option = config.option
    if _IN_WORKER or hasattr(config, "workerinput") or getattr(option, "numprocesses", False) is not None:
        return  # a worker; xdist absent or -p no:xdist (no such option); -n given
    if getattr(option, "tx", None) or getattr(option, "usepdb", False) or getattr(option, "trace", False):
        return  # the user's own --tx; --pdb / --trace debug one process
    cpus = os.cpu_count() or 1
    n = gpu_test_workers(config.option.markexpr, cpus, cuda=_HAS_CUDA, gpu_check=_GPU_CHECK)
    if n:
        config.option.numprocesses = n
        config.option.dist = "load" if config.option.dist == "no" else config.option.dist
        config.option.tx = ["popen"] * n
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, cpus // n)))


@pytest.hookimpl(trylast=True)  # after pytest's own teardown has finalised the test's fixtures
def pytest_runtest_teardown(item):
    if _HAS_CUDA and _IN_WORKER:  # workers share one GPU: each hands its cached blocks back after a test
        torch.cuda.empty_cache()


_config = []


def pytest_configure(config):
    _config.append(config)


def pytest_runtest_logreport(report):
    """On a GPU, one line per test as it ends (outcome, duration, time since the start), so a log cut short
    still says what ran, what failed and where the time went; written by the controlling process only when
    pytest-xdist workers run the tests (it gets every worker's reports)."""
    if not _HAS_CUDA or _IN_WORKER or not (report.when == "call" or report.outcome != "passed") or not _config:
        return
    reporter = _config[-1].pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[{time.time() - _T0:6.1f} s] {report.when:8} {report.outcome:7} "
                            f"{report.duration:6.2f} s  {report.nodeid}")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        items.sort(key=_gpu_rank)  # stable: pytest's order within each group
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device kernel tests run on: CUDA when present, else the CPU through the interpreter."""
    return "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Each test starts from the same global RNG state (torch.randn_like, randint, ... draw from it), so its
    inputs do not depend on which tests a pytest-xdist worker happened to run before it."""
    torch.manual_seed(0)
