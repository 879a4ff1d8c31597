"""The parity rule shared by every kernel test (flash-attn's): judge a kernel against PyTorch's own error.

``golden`` is the reference computed in float64, ``lp`` the same reference computed in the input dtype.
The kernel passes when ``max|out - golden| <= factor * max|lp - golden| + atol`` (factor 2 for outputs,
3 for gradients). ``atol`` is a floor for the case where the reference is exact in the input dtype.
"""
import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_parity(out, golden, lp, *, factor=2.0, atol=None, name="output"):
    assert out.shape == golden.shape, f"{name}: shape {tuple(out.shape)} != golden {tuple(golden.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in kernel output"
    atol = ATOL.get(lp.dtype, 1e-5) if atol is None else atol
    err, ref_err = max_err(out, golden), max_err(lp, golden)
    assert err <= factor * ref_err + atol, (
        f"{name}: kernel error {err:.3e} > {factor} x reference error {ref_err:.3e} + {atol:.0e}")
