"""Compile ahead in parallel: fill the on-disk Triton and torch.compile caches before the timed run.

On a fresh GPU machine most of a ``--quick`` run's time is compiling: our Triton kernels' variants and the
torch.compile / FlexAttention warm-ups of the peers, one after another in the timing process (the 2026-11-27
H200 run reached its time cap with ten compiled rows never started). Before timing anything, the suite can
start worker processes that each build and call once a share of the run's (benchmark, case, provider)
items whose provider compiles something (:func:`compiles`): Triton writes every compiled kernel to its cache
folder (``~/.triton/cache``, ``TRITON_CACHE_DIR``) and Inductor its graphs and kernels to its own
(``TORCHINDUCTOR_CACHE_DIR``), both shared by every process of the machine, so the timed pass that follows
loads them instead of compiling. The workers get a wall-clock budget and are killed when it is spent (both
caches write a file whole or not at all); what they finished is reported and nothing is timed while they run.

``python -m benchmarks.warm ITEMS.json DONE.txt``: one worker; ITEMS.json holds its items, DONE.txt gets the
key of each item it finished, one per line.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks import registry, runner
from benchmarks.report import OURS

WARM_BUDGET_S = 45  # the warm-up's share of a capped --quick run (its time counts against the cap)
WARM_CAP_SHARE = 0.35  # ... and at most this fraction of the cap


def gpu_takes_several_processes(query=None) -> bool:
    """Whether every GPU is in the "Default" compute mode, where several processes may hold a context at once
    (in "Exclusive_Process" a second process could not use it at all). Read with nvidia-smi; False when that
    cannot be read. ``query`` replaces the nvidia-smi call (tests)."""
    try:
        out = query() if query else subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader"], capture_output=True, text=True,
            timeout=30, check=True).stdout
    except Exception:
        return False
    modes = [line.strip() for line in out.splitlines() if line.strip()]
    return bool(modes) and all(m == "Default" for m in modes)


def default_workers(device: str, quick: bool, cpus=None, shared=None) -> int:
    """Workers when ``--warm-workers`` is not given: half the cores up to 8 for a ``--quick`` run on a GPU (the GPU
    check's machine has 16) that several processes may share, none otherwise (a full run's compile time is
    small beside its timing)."""
    cpus = cpus or os.cpu_count() or 1
    if device != "cuda" or not quick or cpus < 4:
        return 0
    return min(8, cpus // 2) if (gpu_takes_several_processes() if shared is None else shared) else 0


def item_key(bench, label, provider) -> str:
    return f"{bench}|{label}|{provider}"


def compiles(provider) -> bool:
    """Whether a provider's first call compiles anything: torch.compile / FlexAttention, and the Triton kernels
    of ours and Liger's. SDPA, cuBLAS and eager references compile nothing; warming them would only spend the
    budget."""
    return provider.compiled or provider.name.startswith(OURS) or provider.name.startswith("liger")


def plan_items(plan, device: str, quick: bool) -> list[dict]:
    """The items a run will call that compile something (:func:`compiles`), as ``{"bench", "case", "label",
    "provider", "compiled"}``: every such provider of every case, except that ``--quick`` runs the compiled
    providers on each benchmark's first case only."""
    items = []
    for bench, reason, cases in plan:
        if reason:
            continue
        for index, case in enumerate(cases):
            for p in bench.providers_for(device):
                if not compiles(p) or quick and p.compiled and index:
                    continue
                items.append(dict(bench=bench.name, case=index, label=bench.label(case), provider=p.name,
                                  compiled=p.compiled, secondary=p.secondary))
    return items


def share(items: list[dict], n: int) -> list[list[dict]]:
    """``items`` in ``n`` lists: the compiled providers (the long warm-ups, the most worth doing before the budget
    runs out) dealt out first and put first in each list, then the other headline providers, then the secondary
    ones (``Provider.secondary``, which ``--quick`` times last), each dealt in run order; within each part a
    list keeps run order, so that a worker builds each case's inputs once."""
    heavy = [it for it in items if it["compiled"]]
    light = [it for it in items if not it["compiled"] and not it.get("secondary")]
    extra = [it for it in items if not it["compiled"] and it.get("secondary")]
    lists = [[] for _ in range(n)]
    for i, it in enumerate(heavy + light + extra):
        lists[i % n].append(it)
    return [lst for lst in lists if lst]


def stop_process(proc):
    """Stop a worker started with ``start_new_session=True`` and everything it started (inductor's compile
    workers); it may have exited on its own meanwhile."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextlib.contextmanager
def workers_stopped_on_exit():
    """A list to append the started worker processes to: every one still running is stopped when the block
    ends, however it ends (an exception, Ctrl-C, or SIGTERM, e.g. from ``timeout``, which would reach this
    process's group only: the workers have their own sessions)."""
    procs = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        def terminate(signum, frame):
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                stop_process(proc)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def warm(items: list[dict], workers: int, budget_s: float, device: str, quick: bool, log=print) -> set[str]:
    """Run ``items`` in ``workers`` processes for at most ``budget_s`` seconds; returns the keys
    (:func:`item_key`) of the items that finished."""
    lists = share(items, workers)
    if not lists:
        return set()
    t0 = time.monotonic()
    done: set[str] = set()
    killed = 0
    with tempfile.TemporaryDirectory(prefix="dlcv_fast_warm_") as tmp, workers_stopped_on_exit() as procs:
        outs = []
        # each worker's torch.compile gets its share of the cores for its own compile processes
        env = {"TORCHINDUCTOR_COMPILE_THREADS": str(max(1, (os.cpu_count() or 1) // len(lists))), **os.environ}
        for i, lst in enumerate(lists):
            spec = Path(tmp) / f"items{i}.json"
            # the last worker (the fewest compiled items) also compiles the roofline's copy kernels
            spec.write_text(json.dumps(dict(device=device, quick=quick, items=lst, roofline=i == len(lists) - 1)))
            outs.append(Path(tmp) / f"done{i}.txt")
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.warm", str(spec), str(outs[-1])],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                          start_new_session=True))
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, budget_s - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                pass
        killed = sum(proc.poll() is None for proc in procs)
        for proc in procs:
            if proc.poll() is None:
                stop_process(proc)
        for out in outs:
            if out.exists():
                done.update(line for line in out.read_text().splitlines() if line)
    log(f"warm-up: {len(lists)} processes built and called {len(done)} of {len(items)} provider x case items once "
        f"in {time.monotonic() - t0:.0f} s (budget {budget_s:.0f} s{f', {killed} stopped at it' if killed else ''}),"
        " filling the Triton and torch.compile caches for the timed pass")
    return done


def work(spec_path: str, out_path: str) -> int:
    """One worker: build and call each of its items once (no timing, no parity), appending each finished
    item's key to ``out_path``."""
    spec = json.loads(Path(spec_path).read_text())
    device, quick = spec["device"], spec["quick"]
    runner.allow_many_recompiles()
    if spec.get("roofline"):
        try:
            runner.compile_copy_kernels(device)
        except Exception:  # the main process measures the ceilings anyway
            pass
    benches = {b.name: b for b in registry.benchmarks("all")}
    case_run, current = None, None
    with open(out_path, "a") as out:
        for it in spec["items"]:
            bench = benches[it["bench"]]
            if (it["bench"], it["case"]) != current:
                case_run = None  # the previous case's inputs go before the next case's are made
                current = (it["bench"], it["case"])
                try:
                    case_run = runner.CaseRun(bench, bench.cases_for(device, quick)[it["case"]], device, n_sets=1)
                except Exception:
                    continue
            if case_run is None:
                continue
            provider = next(p for p in bench.providers_for(device) if p.name == it["provider"])
            try:
                case_run.caller(provider.build(case_run.case, case_run.sets[0], case_run.ctx))()
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception:  # the timed pass reports it
                continue
            out.write(item_key(it["bench"], it["label"], it["provider"]) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(work(sys.argv[1], sys.argv[2]))
