"""Shared pieces of the model tests: the golden-reference parity rule for whole models.

Our model in fp32 is judged against the reference library's model (same weights) run in float64 ("golden"):
``max|ours - golden| <= FACTOR * max|theirs_fp32 - golden| + ATOL``. A whole network reorders many sums
(LayerNorm, matmul blocking, softmax) relative to the reference, so the factor is larger than the 2x of a
single kernel; ATOL only guards outputs the reference computes exactly.
"""
import copy

import torch

from tests.parity import assert_parity

FACTOR = 4.0
ATOL = 1e-7


def fp64_copy(model):
    return copy.deepcopy(model).double()


def to64(x):
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    return x


def check_model(ours_out, ref_out, golden_out, *, name="output", factor=FACTOR):
    assert_parity(ours_out.detach().cpu(), golden_out.detach().cpu(), ref_out.detach().cpu(), factor=factor,
                  atol=ATOL, name=name)
