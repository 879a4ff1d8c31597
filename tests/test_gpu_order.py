"""The order of the GPU test set under the GPU check's time cap (tests/conftest.py)."""
from types import SimpleNamespace

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
