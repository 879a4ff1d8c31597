"""The benchmark command without a GPU: ``python -m benchmarks --quick --device cpu`` runs the CPU fallback at tiny
sizes, says that kernel timings need a CUDA device, exits 0 and writes results.csv / results.json (with the
environment record and the documented columns) and the plots into --out."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ENV_KEYS = {"date", "commit", "gpu", "driver", "torch", "triton"}
ROW_KEYS = {"benchmark", "issue", "case", "params", "provider", "status", "note", "ms", "timer", "ms_launch", "tflops",
            "gbps", "items_per_s", "matmul_frac", "copy_frac", "speedup", "parity_err", "parity_tol", "peak_mib"}


def test_benchmark_command_without_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the command picks its own backends
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--no-save-results",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernel timings need a CUDA device" in proc.stdout

    doc = json.loads((tmp_path / "results.json").read_text())
    assert ENV_KEYS <= set(doc["env"]) and doc["env"]["device"] == "cpu"
    assert doc["roofline"]["matmul_tflops"] > 0 and doc["roofline"]["copy_gbps"] > 0
    assert doc["rows"] and all(set(r) == ROW_KEYS for r in doc["rows"])
    timed = [r for r in doc["rows"] if r["status"] == "ok"]
    assert any(r["benchmark"] == "attn_fwd" and r["provider"] == "sdpa.math" for r in timed)
    assert all(r["ms"] > 0 and r["timer"] == "wallclock" and r["ms_launch"] is None for r in timed)
    assert all(r["peak_mib"] is None for r in doc["rows"])  # GPU memory: measured on a GPU only
    # model rows carry a profile: where the time goes (aten ops on the CPU), heaviest first, shares summing to 1
    profiled = [p for p in doc["profiles"] if p["benchmark"] == "model_infer"]
    assert {p["provider"] for p in profiled} == {"dlcv_fast", "ref.eager", "dlcv_fast.patch"}
    for p in profiled:
        ms = [k["ms"] for k in p["kernels"]]
        assert ms[:-1] == sorted(ms[:-1], reverse=True) and p["total_ms"] > 0
        assert abs(sum(k["share"] for k in p["kernels"]) - 1) < 1e-6
        assert any(k["name"] == "aten::addmm" for k in p["kernels"])
        assert abs(sum(p["kinds"].values()) - p["total_ms"]) < 1e-6 * p["total_ms"] and p["kinds"]["gemm"] > 0
        assert 0 < p["host_ms"] <= p["wall_ms"]  # on the CPU the call is synchronous: host time ~ wall time
    assert "== where the time goes: model_infer" in proc.stdout and "untraced: host" in proc.stdout

    with (tmp_path / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert set(reader.fieldnames) == ENV_KEYS | ROW_KEYS
        assert len(list(reader)) == len(doc["rows"])
    assert (tmp_path / "attn_fwd.png").stat().st_size > 0


def test_plots_survive_a_case_without_speedup(tmp_path):
    """A bar chart whose only peer failed (no speedup on any row) is still drawn, not a ZeroDivisionError
    (seen on the H200 run of 2026-11-27: the model_train reference failed parity)."""
    from types import SimpleNamespace

    from benchmarks import report

    row = dict(benchmark="model_train", case="swin_tiny B=256", provider="dlcv_fast", status="ok", ms=61.6,
               tflops=None, gbps=None, items_per_s=4155.0, speedup=None, params={})
    bench = SimpleNamespace(name="model_train", title="training step", x=None)
    env = dict(gpu="test", device="cpu", torch="2.14.1", date="2026-11-27")
    paths = report.plots(tmp_path, [bench], [row], env)
    assert paths == [tmp_path / "model_train.png"] and paths[0].stat().st_size > 0



def test_plots_of_a_saved_run(tmp_path):
    """``python -m benchmarks --plot RESULTS_JSON`` draws a committed GPU run's plots again, no GPU needed: one
    PNG per benchmark with timed rows (the README shows them)."""
    saved = ROOT / "benchmarks" / "results" / "2026-11-27T2106_nvidia-h200.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--plot", str(saved), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timed = {r["benchmark"] for r in json.loads(saved.read_text())["rows"] if r["status"] == "ok"}
    assert {p.stem for p in tmp_path.glob("*.png")} == timed and len(timed) >= 10


def test_save_results_keeps_the_plots(tmp_path, monkeypatch):
    """A GPU run's JSON, CSV and plots all land under benchmarks/results/ with the run's name."""
    from benchmarks import report

    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "results")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.json", "results.csv", "attn_fwd.png"):
        (out / name).write_text(name)
    env = dict(gpu="NVIDIA H100 80GB HBM3", device="cuda", date="2026-11-28T05:07:00+00:00")
    paths = report.save_results(out, env, [out / "attn_fwd.png"])
    stem = "2026-11-28T0507_nvidia-h100-80gb-hbm3"
    assert [p.relative_to(tmp_path / "results").as_posix() for p in paths] == [
        f"{stem}.json", f"{stem}.csv", f"{stem}/attn_fwd.png"]
    assert (tmp_path / "results" / stem / "attn_fwd.png").read_text() == "attn_fwd.png"


def test_tune_sweeps_run_under_the_interpreter(monkeypatch):
    """benchmarks.tune's groups run end to end (kernels through Triton's interpreter, a host clock for
    do_bench) on tiny shapes, and their parity checks pass for the shipped configs: the GPU sessions that
    run it get lines, not a traceback."""
    import time

    import triton.testing

    from benchmarks import tune

    monkeypatch.setattr(tune, "DEVICE", "cpu")
    monkeypatch.setattr(tune, "CHECK", (1, 2, 33))
    monkeypatch.setattr(tune, "TIME_SHAPE", {64: (1, 1, 40)})
    monkeypatch.setattr(tune, "ROPE_SHAPES", {64: [(1, 1, 40)]})
    monkeypatch.setattr(tune, "ROPE_CANDIDATES", {64: [None]})
    monkeypatch.setattr(tune, "ROPE_KERNEL_CANDIDATES", {64: [None]})
    monkeypatch.setattr(tune, "WINDOW_SHAPES", {"stage3": (1, 14, 14, 2)})
    monkeypatch.setattr(tune, "WINDOW_DKDV", [None])
    monkeypatch.setattr(tune, "WINDOW_FUSED", [None])
    monkeypatch.setattr(tune, "WINDOW_FWD_GROUPED", [None])
    monkeypatch.setattr(tune, "WINDOW_GROUP_SCALE", [2.0])
    monkeypatch.setattr(tune, "WINDOW_CHECK_B", 1)

    def host_clock(fn, warmup=0, rep=0):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    monkeypatch.setattr(tune, "FWD_SHAPES", {"tiny": (1, 2, 40, 33, 40)})
    monkeypatch.setattr(tune, "FWD_CANDIDATES", {64: [(16, 32, 4, 1)]})
    monkeypatch.setattr(tune, "FWD_EXP_EMU", [])  # inline PTX: GPU only
    monkeypatch.setattr(tune, "SPLIT_SHAPES", {"tiny": (1, 2, 70, 20, 40)})
    monkeypatch.setattr(tune, "SPLIT_COUNTS", [1, 2, None])
    monkeypatch.setattr(tune, "SPLIT_TILES", [None])
    monkeypatch.setattr(tune, "LINEAR_SHAPES", {"tiny": (40, 32, 48)})
    monkeypatch.setattr(tune, "LINEAR_CANDIDATES", [(16, 32, 32, 4, 1)])
    monkeypatch.setattr(tune, "LINEAR_DTYPE", torch.float16)  # bf16 is garbage in the interpreter
    monkeypatch.setattr(triton.testing, "do_bench", host_clock)
    monkeypatch.setattr(tune, "_time", host_clock)
    rows = []
    tune.sweep_bwd(64, rows.append, table_only=True)
    tune.sweep_rope(64, rows.append)
    tune.sweep_window(rows.append)
    tune.sweep_fwd(rows.append)
    tune.sweep_split(rows.append)
    tune.sweep_linear(rows.append)
    assert [r["group"] for r in rows] == ["bwd64", "bwd64", "bwd64", *["rope64"] * 5, *["window_stage3"] * 7,
                                          "fwd", "fwd", "fwd", "fwd", *["split"] * 6, "linear", "linear_plain",
                                          "linear_plain", *["linear"] * 4]
    # the GEMM: cuBLAS + GELU, the plain GEMM against cuBLAS, then each tile per-tile and persistent
    assert [(r["kernel"], r.get("default")) for r in rows if r["group"].startswith("linear")] == [
        ("cublas+gelu", None), ("cublas linear", None), ("linear_act none", True), ("linear_act", False),
        ("linear_act persistent", True), ("linear_act", False), ("linear_act persistent", False)]
    assert [r["kernel"] for r in rows if r["group"] == "bwd64"] == ["table", "table (key-major)", "table (TMA)"]
    # the forward: the table's tile (the default), with K/V by TMA (no tail block then), without the tail
    # block, another tile
    assert [(r["default"], r["kv_tma"], r["tail"]) for r in rows if r["group"] == "fwd"] == [
        (True, False, 16), (False, True, 0), (False, False, 0), (False, False, 16)]
    # the window forward grouped and per window, the backward in one kernel and two, each at the default
    # window-group count and at twice it
    assert [r["kernel"] for r in rows if r["group"] == "window_stage3"] == [
        "window forward, grouped", "window forward, per window", "window forward, grouped",
        *["window backward, fused", "window backward, two kernels"] * 2]
    checked = [r for r in rows if "ok" in r]
    # the split group: the query-major backward at each split count, then key-major in one kernel (the
    # launcher's tile, 16 rows) and with the dQ kernel
    assert [r["kernel"] for r in rows if r["group"] == "split"][-3:] == [
        "backward key-major", "backward key-major, 16 rows", "backward key-major, dQ kernel"]
    # rope=: without RoPE (the reference), the two passes (the default), rope= at a tile, q rotated in the
    # kernel (k by its pass), q and k in the kernel
    assert [r["kernel"] for r in rows if r["group"] == "rope64"] == [
        "plain (no rope)", "apply_rope(q,k)+plain", "forward(rope=)", "forward(rope=), q in kernel",
        "forward(rope=), in kernel"]
    assert len(checked) == 27 and all(r["ok"] and r["ms"] > 0 for r in checked), rows
    # every comparison has its shipped default flagged, so the summary can compare against it
    lines = tune.summarize(rows)
    assert len(lines) == 8 and all(": default " in line for line in lines), lines


def test_wsfwd_probe_runs_under_the_interpreter(monkeypatch):
    """The warp-specialization probe's tune group (benchmarks/ws_probe.py): the shipped forward's row first (the
    default), then each candidate with its flag, all within parity of SDPA; the probe refuses what it cannot
    take (no masks: lengths off its tile, head dims other than 64 / 128) with a ValueError."""
    import time

    from benchmarks import tune, ws_probe

    def host_clock(fn, warmup=0, rep=0):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    monkeypatch.setattr(tune, "DEVICE", "cpu")
    monkeypatch.setattr(tune, "FWD_SHAPES", {"long_d64": (1, 2, 128, 128, 64)})
    monkeypatch.setattr(tune, "WS_SHAPES", ("long_d64",))
    monkeypatch.setattr(tune, "WS_CHECK", (1, 2, 128))
    monkeypatch.setattr(tune, "_time", host_clock)
    monkeypatch.setattr(ws_probe, "CANDIDATES", {64: [(64, 64, 4, 2, True), (64, 128, 4, 2, False)]})
    monkeypatch.setattr(tune, "WS_KERNEL_CANDIDATES", {64: [None]})
    rows = []
    tune.sweep_wsfwd(rows.append)
    assert [(r["kernel"], r.get("warp_spec"), r["default"]) for r in rows] == [
        ("forward (table)", None, True), ("forward, warp-specialized", True, False), ("ws probe", True, False),
        ("ws probe", False, False)], rows
    assert all(r["ok"] and r["ms"] > 0 for r in rows), rows
    assert [r.get("ws_applied") for r in rows[2:]] == [None, None]  # no PTX under the interpreter
    lines = tune.summarize(rows)
    assert len(lines) == 1 and ": default " in lines[0], lines

    q = torch.randn(1, 2, 96, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="not a multiple of the tile"):
        ws_probe.forward(q, q, q, config=(64, 64, 4, 2, True))
    x = torch.randn(1, 2, 128, 40, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim 40"):
        ws_probe.forward(x, x, x)


def test_tune_compile_only_launches_each_candidate_once(monkeypatch):
    """The tune warm-up's processes (--compile-only) call every candidate once and time nothing."""
    import triton.testing

    from benchmarks import tune

    for name in ("do_bench", "do_bench_cudagraph"):  # restored after the test
        monkeypatch.setattr(triton.testing, name, getattr(triton.testing, name))
    monkeypatch.setattr(tune, "DEVICE", "cpu")
    monkeypatch.setattr(tune, "LINEAR_SHAPES", {"tiny": (40, 32, 48)})
    monkeypatch.setattr(tune, "LINEAR_CANDIDATES", [(16, 32, 32, 4, 1)])
    monkeypatch.setattr(tune, "LINEAR_DTYPE", torch.float16)
    calls, real = [], tune._call_once
    monkeypatch.setattr(tune, "_call_once", lambda fn, *a, **k: (calls.append(fn), real(fn, *a, **k))[1])
    tune.compile_only()
    rows = []
    tune.sweep_linear(rows.append)
    timed = [r for r in rows if "ms" in r]
    assert len(timed) == len(calls) == 7 and all(r["ms"] != r["ms"] for r in timed)  # NaN: nothing timed
    assert tune.default_warm_jobs(["linear", "fwd", "split", "window"], cpus=16, shared=True) == 4
    assert tune.default_warm_jobs(["linear", "fwd"], cpus=16, shared=False) == 0
    assert tune.default_warm_jobs(["linear"], cpus=16, shared=True) == 0  # one group: nothing to overlap
    assert tune.default_warm_jobs(["a", "b", "c"], cpus=2, shared=True) == 0
    # the warm-up's orchestration: a group whose process fails (here: no GPU) is not counted as compiled
    assert tune.warm_groups(["linear", "fwd"], 2, 120) == []


def test_tune_summary_compares_the_default_with_the_fastest_passing_candidate():
    from benchmarks import tune

    rows = [{"gpu": "x"},
            dict(group="fwd", case="a", kernel="forward (table)", config=[1], ms=2.0, ok=True, default=True),
            dict(group="fwd", case="a", kernel="forward", config=[2], ms=1.0, ok=True),
            dict(group="fwd", case="a", kernel="forward", config=[3], ms=0.5, ok=False),  # wrong: never chosen
            dict(group="fwd", case="a", kernel="forward", config=[4], error="OutOfResources"),
            dict(group="rope64", shape=[1], kernel="plain (no rope)", ms=0.9, reference=True),
            dict(group="rope64", shape=[1], kernel="apply_rope(q,k)+plain", ms=1.0, default=True)]
    assert tune.summarize(rows) == [
        "fwd a: default 2.0000 ms, fastest 1.0000 ms (2.00x) {'kernel': 'forward', 'config': [2]}",
        "rope64 [1]: default 1.0000 ms, fastest 1.0000 ms (1.00x) {'kernel': 'apply_rope(q,k)+plain'}; "
        "reference (plain (no rope)) 0.9000 ms"]


def test_roofline_copy_kernel_copies_every_element():
    """The Triton streaming copy that the GPU roofline times (one of its copy-ceiling candidates), run under
    the interpreter: every element copied, the ragged last block masked, nothing written past the end."""
    import torch

    from benchmarks import runner

    for block, warps in runner.COPY_CONFIGS[:1]:
        src = torch.randn(3 * block + 17)
        dst = torch.full((src.numel() + 5,), float("nan"))
        runner._triton_copy(src, dst, block, warps)
        assert torch.equal(dst[:src.numel()], src) and dst[src.numel():].isnan().all()


def test_flag_providers_set_the_flags_for_the_whole_call():
    """The suite's dlcv_fast.triton+tma and +keymajor providers run ours with the TMA loads / key-major dK/dV
    tiles on around the whole timed call (with_backward's gradient included), and leave the defaults as they
    were."""
    from benchmarks.attention import with_key_major, with_tma
    from benchmarks.registry import Provider, with_backward
    from dlcv_fast.kernels import attention as A

    seen = []

    def build(case, x0, ctx):
        def fn(x):
            seen.append(("fwd", A.KV_TMA, A.BWD_TMA))
            return x["q"] * 2
        return fn

    x = {"q": torch.ones(2, requires_grad=True), "do": torch.ones(2)}
    x["q"].register_hook(lambda g: seen.append(("bwd", A.KV_TMA, A.BWD_TMA)))
    p = with_tma(with_backward(Provider("dlcv_fast.triton", build), "q"))
    assert p.name == "dlcv_fast.triton+tma"
    p.build({}, x, {})(x)
    assert seen == [("fwd", True, True), ("bwd", True, True)]
    assert (A.KV_TMA, A.BWD_TMA) == (None, None)  # back to the automatic choice
    seen.clear()
    x["q"].register_hook(lambda g: seen.append(("bwd key-major", A.BWD_KEY_MAJOR)))
    p = with_key_major(with_backward(Provider("dlcv_fast.triton", build), "q"))
    assert p.name == "dlcv_fast.triton+keymajor"
    p.build({}, x, {})(x)
    assert ("bwd key-major", True) in seen and not A.BWD_KEY_MAJOR


def test_time_call_says_why_a_short_call_was_not_graph_timed(monkeypatch):
    """A short call that cannot be captured in a CUDA graph keeps its host-launched time, and the row's note
    says so with the error (such a time includes host overhead and is not comparable with graph-timed ones)."""
    import triton.testing

    from benchmarks import runner

    def no_capture(fn, **kw):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: 0.5)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", no_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    ms, timer, launch, note = runner.time_call(lambda: None, "cuda", quick=True)
    assert (ms, timer, launch) == (0.5, "do_bench", 0.5)
    assert note.startswith("no CUDA graph") and "stream is capturing" in note
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: 0.1)
    assert runner.time_call(lambda: None, "cuda", quick=True) == (0.1, "cudagraph", 0.5, "")


@pytest.mark.parametrize("bench_name,case", [
    ("window_attn_fwd", dict(name="t", B=1, H=14, W=14, C=32, heads=2, window=7, shift=3)),
    ("window_attn_fwd", dict(name="t", B=2, H=7, W=14, C=32, heads=2, window=7, shift=0)),
    ("attn_fwd", dict(name="t", B=2, H=2, Lq=40, Lk=40, D=16, causal=True, padding=False)),
    ("attn_short_fwd", dict(name="t", B=2, H=2, Lq=20, Lk=20, D=16, causal=True, padding=True)),
])
def test_flex_providers_compute_the_same_attention(monkeypatch, bench_name, case):
    """The FlexAttention providers (GPU-timed, compiled) express the same attention as the reference: their
    score_mod / mask_mod, run through flex_attention's eager path on the CPU, pass the suite's parity check
    (relative position bias + shifted-window mask for Swin; causal and key padding for dense attention). Forward
    only: flex_attention has no backward on the CPU, and the fwd+bwd providers differentiate the same mods."""
    from benchmarks import attention, registry, runner, window_attention

    monkeypatch.setattr(attention, "FLEX_COMPILE", False)
    monkeypatch.setattr(window_attention, "FLEX_COMPILE", False)
    bench = {b.name: b for b in registry.benchmarks()}[bench_name]
    run = runner.CaseRun(bench, case, "cpu")
    trial = run.trial(next(p for p in bench.providers if p.name == "flex"))
    assert trial.status == "ok", trial.note


def test_warm_up_workers_call_every_item_once(monkeypatch):
    """benchmarks/warm.py: the run's (benchmark, case, provider) items dealt to worker processes (compiled ones
    first), each worker reporting what it built and called; a spent budget stops the workers, and the timed run
    goes on."""
    from benchmarks import registry, warm

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as the command runs: the workers pick their own backends
    plan = [(b, b.available(), b.cases_for("cpu", True)) for b in registry.benchmarks("all", ["rope_fwd", "layer_norm"])]
    items = warm.plan_items(plan, "cpu", True)
    want = {warm.item_key(it["bench"], it["label"], it["provider"]) for it in items}
    # 4 benchmarks x dlcv_fast on the CPU (torch.eager compiles nothing: not warmed)
    assert len(want) == len(items) == 4 and {it["provider"] for it in items} == {"dlcv_fast"}
    lines = []
    assert warm.warm(items, 2, 300, "cpu", True, log=lines.append) == want
    assert lines[0].startswith("warm-up: 2 processes built and called 4 of 4 ")
    lines.clear()
    assert warm.warm(items, 2, 0.0, "cpu", True, log=lines.append) == set()  # stopped before any item finished
    assert "2 stopped at it" in lines[0]


def test_warm_up_shares_the_compiled_items_out_first():
    from benchmarks import warm

    items = [dict(bench="b", case=c, label=str(c), provider=p, compiled=p.endswith("compile"))
             for c in range(3) for p in ("ours", "peer", "ours.compile", "peer.compile")]
    items = [it for it in items if not it["compiled"] or it["case"] == 0]  # --quick: compiled on case 0 only
    lists = warm.share(items, 2)
    assert [sum(it["compiled"] for it in lst) for lst in lists] == [1, 1]
    for lst in lists:  # compiled items first, each part in run order
        heavy = [it for it in lst if it["compiled"]]
        assert lst[:len(heavy)] == heavy == sorted(heavy, key=items.index)
        assert lst[len(heavy):] == sorted(lst[len(heavy):], key=items.index)
    assert sorted(map(items.index, lists[0] + lists[1])) == list(range(len(items)))
    assert [len(lst) for lst in warm.share(items, 20)] == [1] * len(items)  # no empty worker lists
    # secondary providers (timed last by --quick) after every headline one in each list
    for it in items:
        it["secondary"] = it["provider"] == "peer"
    for lst in warm.share(items, 2):
        kinds = [("compiled" if it["compiled"] else "secondary" if it["secondary"] else "headline") for it in lst]
        assert kinds == sorted(kinds, key=["compiled", "headline", "secondary"].index), kinds
    assert warm.default_workers("cuda", True, cpus=16, shared=True) == 8
    assert warm.default_workers("cuda", True, cpus=16, shared=False) == 0  # one process per GPU at a time
    assert warm.default_workers("cuda", False, cpus=16, shared=True) == 0
    assert warm.default_workers("cpu", True, cpus=16, shared=True) == 0
    # nvidia-smi's compute modes: several processes only in "Default" on every GPU
    assert warm.gpu_takes_several_processes(lambda: "Default\n")
    assert not warm.gpu_takes_several_processes(lambda: "Default\nExclusive_Process\n")
    assert not warm.gpu_takes_several_processes(lambda: "")

    def no_nvidia_smi():
        raise FileNotFoundError("nvidia-smi")

    assert not warm.gpu_takes_several_processes(no_nvidia_smi)


def test_warm_up_workers_do_not_outlive_the_run():
    """Workers run in their own sessions (so they can be killed with what they start); an exception, or SIGTERM
    from `timeout` (which reaches only the run's process group), still stops them."""
    import signal
    import time

    from benchmarks.warm import workers_stopped_on_exit

    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    with pytest.raises(KeyboardInterrupt), workers_stopped_on_exit() as procs:
        procs.append(subprocess.Popen(sleeper, start_new_session=True))
        raise KeyboardInterrupt
    assert procs[0].poll() is not None

    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "from benchmarks.warm import workers_stopped_on_exit\n"
         "with workers_stopped_on_exit() as procs:\n"
         f"    procs.append(subprocess.Popen({sleeper!r}, start_new_session=True))\n"
         "    print(procs[0].pid, flush=True)\n"
         "    time.sleep(120)\n"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    for _ in range(100):  # reaped by the parent before it exited: no such process any more
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the worker outlived its parent")


def test_quick_times_every_headline_before_any_secondary_provider(tmp_path, monkeypatch):
    """--quick under a time cap: pass A times the headline providers of every benchmark round by round (every
    first case, then every second one), pass B the compiled ones on first cases, pass C the secondary providers
    with the time left, the rest skipped with a note saying why; the files list the rows in registered order.
    A synthetic registry on the CPU, every provider build costing one second of a fake clock."""
    from types import SimpleNamespace

    import benchmarks.__main__ as bm
    from benchmarks import registry, report, runner

    clock, built = [0.0], []

    def provider(name, **kw):
        def build(case, x0, ctx):
            clock[0] += 1.0
            built.append((bench_of[id(case)], case["i"], name))
            return lambda x: x["a"] * 2
        return registry.Provider(name, build, devices=("cpu",), **kw)

    class Quick(registry.Benchmark):
        def cases_for(self, device, quick):  # every case on the CPU too (the CPU mode keeps one)
            return self.cases

    providers = [provider("dlcv_fast"), provider("dlcv_fast.variant", secondary=True), provider("peer"),
                 provider("peer.slow", secondary=True), provider("peer.compile", compiled=True)]
    bench_of, benches = {}, []
    for name in ("b0", "b1", "b2"):
        cases = [{"i": 0}, {"i": 1}]
        bench_of.update({id(c): name for c in cases})
        benches.append(Quick(
            name=name, suite="kernels", issue=3, title=name, cases=cases, quick=cases, providers=providers,
            make_inputs=lambda case, device, dtype: {"a": torch.ones(4, dtype=dtype)},
            reference=lambda case, x, ctx: [(x["a"].double() * 2, x["a"] * 2, 2.0)],
            view=lambda case, out: [out], label=lambda case: f"case {case['i']}"))
    monkeypatch.setattr(registry, "benchmarks", lambda suite="all", only=None: benches)
    monkeypatch.setattr(bm, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(bm, "measure", lambda run, p, *a, **k: {"status": run.trial(p).status, "ms": 1.0})
    monkeypatch.setattr(bm, "COMPILE_RESERVE_S", 0)
    monkeypatch.setattr(bm, "QUICK_COMPILED_SHARE_S", 3)
    monkeypatch.setattr(runner, "roofline",
                        lambda device, quick=False: dict(matmul_tflops=1.0, copy_gbps=1.0, matmul="-", copy="-"))
    monkeypatch.setattr(report, "plots", lambda *a, **k: [])

    # 12 headline builds (3 benchmarks x 2 cases x 2) end pass A at 12 s, within the cap less the compiled share
    # (20 - 3 s); 3 compiled builds end pass B at 15 s; pass C then has 5 s for the 12 secondary rows.
    assert bm.main(["--quick", "--device", "cpu", "--time-limit", "20", "--warm-workers", "0", "--no-save-results",
                    "--out", str(tmp_path)]) == 0
    headline = [(b, i, p) for i in (0, 1) for b in ("b0", "b1", "b2") for p in ("dlcv_fast", "peer")]
    compiled = [(b, 0, "peer.compile") for b in ("b0", "b1", "b2")]
    secondary = [(b, i, p) for i in (0, 1) for b in ("b0", "b1", "b2") for p in ("dlcv_fast.variant", "peer.slow")]
    assert built == headline + compiled + secondary[:5]

    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["benchmark"], r["case"], r["provider"]) for r in rows] == [
        (b, f"case {i}", p.name) for b in ("b0", "b1", "b2") for i in (0, 1) for p in providers]
    status = {(r["benchmark"], int(r["case"][-1]), r["provider"]): (r["status"], r["note"]) for r in rows}
    assert all(status[k] == ("ok", "") for k in headline + compiled + secondary[:5])
    assert all(status[k] == ("skipped", bm.SECONDARY_CAP_NOTE) for k in secondary[5:])
    assert all(status[b, 1, "peer.compile"] == ("skipped", "--quick: compiled providers on the first case only")
               for b in ("b0", "b1", "b2"))
    # speedups over the fastest peer, whichever pass timed it
    assert all(r["speedup"] == 1.0 for r in rows if r["status"] == "ok")

    # a cap of 10 s: pass A stops at 7 s (10 - 3) in the second round, pass B takes the last 3 s, pass C gets none
    clock[0], built[:] = 0.0, []
    assert bm.main(["--quick", "--device", "cpu", "--time-limit", "10", "--warm-workers", "0", "--no-save-results",
                    "--out", str(tmp_path)]) == 0
    assert built == headline[:7] + compiled
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    status = {(r["benchmark"], int(r["case"][-1]), r["provider"]): (r["status"], r["note"]) for r in rows}
    assert all(status[k] == ("skipped", "time cap") for k in headline[7:])
    assert all(status[k] == ("skipped", bm.SECONDARY_CAP_NOTE) for k in secondary)


def test_every_benchmark_times_a_headline_comparison_first():
    """Each benchmark's first provider (ours) and at least one peer are headline on a GPU, so --quick's first pass
    compares something; the variants of ours and the slow SDPA backends are secondary."""
    from benchmarks import registry

    for bench in registry.benchmarks():
        headline = [p.name for p in bench.providers_for("cuda") if not p.secondary]
        assert headline[0] == bench.providers_for("cuda")[0].name and headline[0].startswith("dlcv_fast"), bench.name
        assert any(not n.startswith("dlcv_fast") for n in headline) or bench.name == "attn_rope_fwd", bench.name
        secondary = {p.name for p in bench.providers if p.secondary}
        assert not secondary & {"sdpa.flash", "sdpa.cudnn", "timm.eager", "ref.eager", "ref.compile", "torch.eager"}
        if bench.name.startswith("attn_") and bench.name != "attn_rope_fwd":
            assert {"dlcv_fast.cuda", "dlcv_fast.triton+tma", "sdpa.efficient", "sdpa.math"} <= secondary


def test_gpu_timing_takes_several_samples_with_gc_paused(monkeypatch):
    """time_call on a GPU (triton's do_bench stubbed): a call longer than --quick's 25 ms budget is timed again
    with room for MIN_SAMPLES calls (do_bench takes rep / its estimate samples: one for a 65 ms training step);
    Python's garbage collector is paused while calls are timed and restored after."""
    import gc

    import triton.testing

    from benchmarks import runner

    seen = []

    def do_bench(fn, warmup=25, rep=100, return_mode="mean"):
        seen.append((rep, gc.isenabled()))
        return 65.0

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    assert gc.isenabled()
    ms, timer, ms_launch, note = runner.time_call(lambda: None, "cuda", quick=True)
    assert (ms, timer, note) == (65.0, "do_bench", "")
    assert seen == [(25, False), (65.0 * (runner.MIN_SAMPLES + 1), False)] and gc.isenabled()
    seen.clear()
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup=25, rep=100, return_mode="mean":
                        seen.append(rep) or 20.0)
    runner.time_call(lambda: None, "cuda", quick=False)  # 300 ms budget: 15 samples of 20 ms, no second run
    assert seen == [300]
