"""Random-shape sweep of the CUDA kernels under the CPU emulation: ``python -m tests.csrc.emu.fuzz [--minutes M]
[--seed S]``. Each trial draws an attention or window-attention problem inside the CUDA kernels' scope (sizes,
head dims, masks, biases, GQA, strided views, dtypes) and a thread-schedule seed, runs forward and backward on
backend "cuda" and checks them with tests/parity.py's rule against float64. Prints each failing case (enough to
rerun it) and exits 1 if any failed. test_cuda_emulated.py runs a few trials of it in CI.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback

import torch

import dlcv_fast
from dlcv_fast import backend as _backend
from tests.csrc.emu import build
from tests.kernels import test_attention as attn_tests
from tests.kernels import test_window_attention as win_tests

MASKS = ["none", "causal", "padding", "leftpad", "holes", "prefix", "bias", "bias_b", "bias_full",
         "causal+padding", "prefix+padding", "causal+padding+bias", "causal+leftpad", "leftpad+bias_full"]


def route_cuda_to_emulation(ops, setattr=setattr):
    """Backend "cuda" on CPU tensors -> the emulated ops (ops without a CUDA kernel: their default). ``setattr``:
    how to patch dlcv_fast.backend (test_cuda_emulated.py's fixture passes pytest's monkeypatch.setattr)."""
    real = _backend.resolve

    def resolve(device, backend=None, op=None):
        if (backend if backend is not None else _backend.get_backend()) == "cuda" and op in _backend.CUDA_OPS:
            return "cuda"
        return real(device, backend, op)

    setattr(_backend, "resolve", resolve)
    setattr(_backend, "cuda_op", lambda name: getattr(ops, name))


def attention_case(rng: random.Random) -> dict:
    Hkv = rng.choice([1, 1, 2, 3])
    Lq = rng.choice([1, 2, rng.randint(1, 80), rng.randint(60, 200)])
    Lk = rng.choice([Lq, 1, rng.randint(1, 80), rng.randint(60, 200)])
    mask = rng.choice(MASKS)
    D = rng.choice([8, 16, 24, 32, 40, 48, 64, 72, 80, 96, 104, 128])
    rope = None  # (R, table kind): RoPE inside the forward, where q and k have the same length
    if Lq == Lk and rng.random() < 0.3:
        rope = (rng.randint(1, D // 2), rng.choice(["n", "bn"]))
    return dict(kind="attention", B=2 if "leftpad" in mask else rng.randint(1, 2), Hq=Hkv * rng.choice([1, 2]),
                Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, mask=mask, rope=rope, dtype=rng.choice(["float16", "bfloat16"]),
                packed=rng.random() < 0.3, seed=rng.randint(0, 1 << 30))


def window_case(rng: random.Random) -> dict:
    while True:
        wh, ww = rng.randint(1, 12), rng.randint(1, 12)
        if wh * ww <= 64 and wh * ww > 1:
            break
    H, W = rng.randint(wh, 3 * wh + 2), rng.randint(ww, 3 * ww + 2)
    shift = (rng.choice([0, wh // 2]) if H > wh else 0, rng.choice([0, ww // 2]) if W > ww else 0)
    return dict(kind="window", B=rng.randint(1, 2), H=H, W=W, heads=rng.randint(1, 3), D=rng.choice(
        [8, 16, 24, 32, 40, 64]), window=(wh, ww), shift=shift, table=rng.random() < 0.8,
        qkv_bias=rng.random() < 0.7, dtype=rng.choice(["float16", "bfloat16"]), sms=rng.choice(["1", "132"]),
        seed=rng.randint(0, 1 << 30))


def run_case(c: dict) -> None:
    os.environ["DLCV_FAST_EMU_SEED"] = str(c["seed"] % 1000)
    torch.manual_seed(c["seed"])  # the output gradient check_parity draws
    dtype = getattr(torch, c["dtype"])
    if c["kind"] == "attention":
        q, k, v = attn_tests.make_inputs(c["B"], c["Hq"], c["Hkv"], c["Lq"], c["Lk"], c["D"], dtype, "cpu",
                                         seed=c["seed"])
        if c["packed"] and c["Hq"] == c["Hkv"] and c["Lq"] == c["Lk"]:  # views of one (B, L, 3, H, D) tensor
            packed = torch.stack((q, k, v), 2).transpose(1, 3).contiguous()  # (B, L, 3, H, D)
            q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
        kw = attn_tests.make_mask_args(c["mask"], c["B"], c["Hq"], c["Lq"], c["Lk"], dtype, "cpu")
        if c.get("rope"):
            R, kind = c["rope"]
            angles = torch.rand((c["B"], c["Lq"], R) if kind == "bn" else (c["Lq"], R),
                                generator=torch.Generator().manual_seed(c["seed"])) * 6
            kw["rope"] = (angles.cos(), angles.sin())
        with dlcv_fast.use_backend("cuda"):
            attn_tests.check_parity(q, k, v, kw)
    else:
        os.environ["DLCV_FAST_EMU_SMS"] = c["sms"]
        inputs = win_tests.make_inputs(c["B"], c["H"], c["W"], c["heads"], c["D"], c["window"], dtype, "cpu",
                                       table=c["table"], qkv_bias=c["qkv_bias"], seed=c["seed"])
        with dlcv_fast.use_backend("cuda"):
            win_tests.check_parity(inputs, dict(num_heads=c["heads"], window_size=c["window"],
                                                shift_size=c["shift"]))


def sweep(seed: int, trials: int | None = None, seconds: float | None = None, out=sys.stdout) -> list:
    rng = random.Random(seed)
    failed, start, n = [], time.time(), 0
    while (trials is None or n < trials) and (seconds is None or time.time() - start < seconds):
        c = attention_case(rng) if rng.random() < 0.6 else window_case(rng)
        n += 1
        try:
            run_case(c)
        except Exception as e:  # noqa: BLE001 - every failure is reported with its case
            failed.append((c, e))
            print(f"FAIL {c}\n  {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=out, flush=True)
            if not isinstance(e, AssertionError):
                traceback.print_exc(file=out)
    print(f"{n} trials, {len(failed)} failed ({time.time() - start:.0f} s)", file=out, flush=True)
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    route_cuda_to_emulation(build.load())
    return 1 if sweep(a.seed, seconds=60 * a.minutes) else 0


if __name__ == "__main__":
    sys.exit(main())
