"""Ahead-of-time compile check, no GPU needed.

Every shipped config of every Triton kernel (each kernel module's ``aot_specs()``) compiles for sm_90 and
sm_80 with no register spill and within the arch's shared memory, and the Hopper forward uses wgmma; the
exceptions, each with its reason, are listed in aot_known_problems.txt (reported as xfail).
The compiles run in fresh processes with ``TRITON_INTERPRET=0`` (dlcv_fast/aot.py), so this works here
although conftest.py turns the interpreter on. ``python -m benchmarks.compile_report`` prints the numbers.
"""
from pathlib import Path

import pytest
import triton

from dlcv_fast import aot

# One xdist worker compiles the whole list (itself with 2 processes) while the other runs the rest of the suite.
pytestmark = pytest.mark.xdist_group("aot")

# The list was recorded with this triton (its ptxas and flags decide the exact spills); on another version a
# listed config that compiles cleanly is not an error, but an unlisted one that spills still fails.
KNOWN_PROBLEMS_TRITON = "3.8.0"
KNOWN_PROBLEMS = {line.split("#")[0].strip(): line.split("#", 1)[1].strip()
                  for line in (Path(__file__).parent / "aot_known_problems.txt").read_text().splitlines()
                  if line.strip() and not line.startswith("#")}

ARCHS = aot.DEFAULT_ARCHS
MODULES = aot.kernel_modules()
SPECS = aot.collect_specs(MODULES)

WGMMA_SPECS = [s for s in SPECS if s.expect_wgmma]
WS_SPECS = [s for s in SPECS if s.expect_ws]
HOPPER = 90


def _wanted(request):
    """(spec id, arch) pairs that the selected tests of this module look at."""
    pairs = set()
    for item in request.session.items:
        params = item.callspec.params if item.module is request.module and hasattr(item, "callspec") else {}
        if "spec" in params:
            pairs.add((params["spec"].id, params.get("arch", HOPPER)))
    return pairs


@pytest.fixture(scope="module")
def compiled(request):
    """{(spec id, arch): AotResult} for what this session selected, compiled once (2 processes)."""
    return {(r.id, r.arch): r for r in aot.compile_all(MODULES, ARCHS, jobs=2, only=_wanted(request))}


@pytest.mark.parametrize("spec,arch", [pytest.param(s, a, id=f"{s.id}-sm_{a}")
                                       for s, a in aot.work_list(SPECS, ARCHS)])
def test_compiles_without_spills_within_smem(compiled, spec, arch):
    r = compiled[(spec.id, arch)]
    assert r.error is None, f"{spec.id} does not compile for sm_{arch}: {r.error}"
    limit = aot.SMEM_LIMIT[arch]
    problems = []
    if r.spill_bytes:
        problems.append(f"spills {r.spill_bytes} bytes (stack {r.stack_bytes} B, {r.regs} registers)")
    if r.smem > limit:
        problems.append(f"needs {r.smem} B of shared memory, over the {limit} B of sm_{arch}")
    key = f"{spec.id}-sm_{arch}"
    if key in KNOWN_PROBLEMS:
        if not problems and triton.__version__ != KNOWN_PROBLEMS_TRITON:
            return
        assert problems, f"{key} compiles cleanly now: remove it from aot_known_problems.txt"
        pytest.xfail(f"known problem: {'; '.join(problems)}")
    assert not problems, f"{spec.id} on sm_{arch}: " + "; ".join(problems)


@pytest.mark.parametrize("spec", WGMMA_SPECS, ids=lambda s: s.id)
def test_hopper_forward_uses_wgmma(compiled, spec):
    r = compiled[(spec.id, HOPPER)]
    assert r.error is None, f"{spec.id} does not compile for sm_{HOPPER}: {r.error}"
    assert r.wgmma, f"{spec.id}: no wgmma in the sm_{HOPPER} PTX"


@pytest.mark.parametrize("spec", WS_SPECS, ids=lambda s: s.id)
def test_warp_specialized_forward_is_split_into_partitions(compiled, spec):
    """The forward's warp-specialized tiles (FWD_WARP_SPEC) really are: Triton's pass split them into warp
    partitions with register rebalancing (setmaxnreg) on sm_90, rather than quietly compiling one partition."""
    r = compiled[(spec.id, HOPPER)]
    assert r.error is None, f"{spec.id} does not compile for sm_{HOPPER}: {r.error}"
    assert r.warp_specialized, f"{spec.id}: no setmaxnreg in the sm_{HOPPER} PTX (not warp-specialized)"


def test_every_launchable_attention_config_is_checked():
    """The AOT specs cover every tile the attention launchers can pick, for every head dim 1..256, kind,
    arch and 16-bit dtype, the dK/dV kernel's key-major tiles included, with and without dQ written in them
    (so a table edit cannot ship an unchecked tile)."""
    import torch

    from dlcv_fast.kernels import attention as A

    checked = {(s.name, s.constexprs["BLOCK_D"], s.constexprs.get("BLOCK_M"), s.constexprs.get("BLOCK_N"),
                s.num_warps, s.num_stages, arch, s.constexprs.get("KEY_MAJOR", False),
                s.constexprs.get("WRITE_DQ", False))
               for s in SPECS if s.name.startswith("_attn_") for arch in s.archs}
    missing = []
    for arch in A.ARCHS:
        for d in range(1, 257):
            block_d = A.padded_head_dim(d)
            for dtype in (torch.float16, torch.bfloat16):
                for kind in ("plain", "bias"):
                    cfgs = [("_attn_fwd", c) for c in aot.shipped_configs(A.fwd_configs, block_d, dtype, kind, arch,
                                                                          d < block_d)]
                    kv, q = aot.shipped_configs(A.bwd_configs, block_d, dtype, kind, arch, d < block_d)
                    cfgs = [(name, c, False, False) for name, c in cfgs + [("_attn_bwd_dkdv", kv), ("_attn_bwd_dq", q)]]
                    km = aot.shipped_configs(A.bwd_configs, block_d, dtype, kind, arch, d < block_d, True)[0]
                    # the key-major tiles (BWD_KEY_MAJOR), alone and writing dQ (all keys in one block)
                    cfgs += [("_attn_bwd_dkdv", km, True, False),
                             ("_attn_bwd_dkdv", A.fused_dq_config(km, block_d, kind, arch), True, True)]
                    missing += [(name, d, kind, arch, c, key_major, write_dq) for name, c, key_major, write_dq in cfgs
                                if (name, block_d, *c, arch, key_major, write_dq) not in checked]
    # RoPE rotated in the forward (ROPE_IN_KERNEL): rope_config's tile at every head dim it takes
    rope_checked = {(s.constexprs["BLOCK_D"], s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps,
                     s.num_stages, arch) for s in SPECS if s.name == "_attn_fwd" and s.constexprs.get("ROPE")
                    for arch in s.archs}
    for arch in A.ARCHS:
        for d in range(1, 257):
            if A.rope_in_kernel_problem(d, d // 2, False) is None:
                for dtype in (torch.float16, torch.bfloat16):
                    cfg = tuple(aot.shipped_configs(A.rope_config, d, dtype, arch))
                    if (d, *cfg, arch) not in rope_checked:
                        missing.append(("_attn_fwd rope", d, arch, cfg))
    # q alone rotated in the forward (ROPE_IN_KERNEL "q"): the plain tiles at the head dims it takes
    ropeq_checked = {(s.constexprs["BLOCK_D"], s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps,
                      s.num_stages, arch) for s in SPECS if s.name == "_attn_fwd" and s.constexprs.get("ROPE_Q")
                     for arch in s.archs}
    for arch in A.ARCHS:
        for d in (32, 64, 128):
            for dtype in (torch.float16, torch.bfloat16):
                for cfg in aot.shipped_configs(A.rope_q_configs, d, dtype, arch):
                    if (d, *cfg, arch) not in ropeq_checked:
                        missing.append(("_attn_fwd rope q", d, arch, tuple(cfg)))
    assert not missing, f"tiles the launchers can pick that no AOT spec compiles: {sorted(set(missing))[:10]}"
