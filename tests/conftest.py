"""Test-suite set-up.

Without a CUDA device the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1 must be
set before triton is imported, hence here). Tests marked ``gpu`` need a CUDA device and are skipped,
with the reason shown, where there is none (run them with ``pytest -m gpu`` on a GPU machine).
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk caches (default /tmp/torchinductor_$USER) outlive a change of our ops: a cached
# joint graph keeps calling a backward op with its old arguments (seen after window_attention_bwd lost one),
# as torch keys them on the forward graph only. Each test session compiles into its own fresh folder.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dlcv_fast_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


# On a GPU the GPU check gives `pytest -m gpu` a time cap (3 minutes): the tests of the attention kernels and
# the models come first, those of kernels that are off by default (the fused MLP GEMM, the exp2 split) last, so
# a cap cuts the latter. Files not listed keep their place between the two groups, in pytest's order.
GPU_FIRST = ("tests/kernels/test_attention.py", "tests/kernels/test_window_attention.py", "tests/models/")
GPU_LAST = ("tests/kernels/test_linear_act.py", "tests/kernels/test_exp2_asm.py")


def _gpu_rank(item) -> int:
    path = item.nodeid.split("::")[0]
    if path.startswith(GPU_FIRST):
        return 0
    return 2 if path.startswith(GPU_LAST) else 1


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
