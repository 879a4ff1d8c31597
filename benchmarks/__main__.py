"""python -m benchmarks [--suite kernels|models|all] [--quick] [--out DIR]: run the benchmark suite.

Every provider of every case runs in this one process on the same inputs: first one call checked against the
reference (parity), then timed. Without --quick the run goes benchmark by benchmark, case by case, every provider
of a case in the order registered. --quick runs in three passes so that the time cap cuts the least important
work: (A) the headline providers (ours and the peers the issues' speed targets name; registry.Provider.secondary)
that compile nothing, round by round (every benchmark's first quick case, then every second one, ...); (B) the
headline torch.compile / FlexAttention providers on each benchmark's first case; (C) the secondary providers
(variants of ours, slow or redundant baselines), round by round, with whatever time is left. The output rows are
in the registered order (benchmark, case, provider) whatever order they ran in.

Results go to DIR/results.{csv,json} and DIR/<benchmark>.png, and on a GPU also to
benchmarks/results/<date>_<card>.{json,csv} and benchmarks/results/<date>_<card>/*.png. Without a CUDA device
the command times the CPU fallback at tiny sizes and says that kernel timings need a CUDA device.

Exit status: on a GPU, 1 when one of dlcv_fast's own providers failed or gave a wrong result, else 0; on the
CPU always 0 (failures are listed). Peers that are missing or fail are reported and do not change it.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

from benchmarks import registry, report, runner, warm

QUICK_TIME_LIMIT_S = 140  # the GPU check gives the whole command 180 s; on the 2026-11-29 H200 run imports, plots and
# files took under 15 s of it, and the last pass (secondary providers) starts no torch.compile warm-up
COMPILE_RESERVE_S = 45  # a torch.compile warm-up is not started with less time left than this
WARMED_COMPILE_RESERVE_S = 15  # ... or than this when the warm-up workers (benchmarks/warm.py) compiled it already
QUICK_COMPILED_SHARE_S = 50  # --quick with a cap: the first pass stops this long before it, for the compiled pass
WARMED_COMPILED_SHARE_S = 25  # ... when the warm-up workers compiled every compiled provider already
SECONDARY_CAP_NOTE = "time cap (--quick runs the secondary providers last)"
# --quick runs the compiled providers in this order of benchmarks (the issues' targets against FlexAttention and
# torch.compile first); benchmarks not named here follow in registry order.
COMPILED_ORDER = ("window_attn_fwd_bwd", "window_attn_fwd", "model_infer", "rope_fwd_bwd", "attn_fwd")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("kernels", "models", "all"), default="all")
    ap.add_argument("--quick", action="store_true",
                    help="headline shapes only, in three passes: the headline providers of every benchmark (its "
                         "first case, then its second, ...), then the compiled ones on each benchmark's first case "
                         "only (the first pass ends "
                         f"{QUICK_COMPILED_SHARE_S} s before the cap to leave them time), then the secondary providers "
                         f"(variants, slow baselines) with the time left; a time cap ({QUICK_TIME_LIMIT_S} s on a GPU "
                         "unless --time-limit says otherwise)")
    ap.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default: bench-out)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="benchmarks whose name contains one of these")
    ap.add_argument("--time-limit", type=float, default=None, metavar="S",
                    help="skip what would start after S seconds (reported as skipped)")
    ap.add_argument("--save-results", action=argparse.BooleanOptionalAction, default=None,
                    help="also copy the CSV/JSON to benchmarks/results/ (default: on for GPU runs)")
    ap.add_argument("--warm-workers", type=int, default=None, metavar="N",
                    help="before timing, N processes build and call once every provider that compiles (ours, Liger, "
                         "torch.compile, FlexAttention) to fill the Triton and torch.compile caches "
                         "(benchmarks/warm.py; default: min(8, cores / 2) for --quick on a GPU, else 0)")
    ap.add_argument("--warm-budget", type=float, default=None, metavar="S",
                    help=f"seconds the warm-up may take (default: {warm.WARM_BUDGET_S} s, at most "
                         f"{warm.WARM_CAP_SHARE * 100:.0f}%% of a time cap)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--plot", type=Path, metavar="RESULTS_JSON",
                    help="draw the plots of a saved run (e.g. benchmarks/results/<run>.json) into --out and exit; "
                         "no GPU needed")
    return ap.parse_args(argv)


def list_benchmarks(benches):
    for b in benches:
        print(f"{b.name:<20} issue {b.issue:<2} {b.suite:<8} {b.title}")
        print(f"{'':<20} {len(b.cases)} cases, {len(b.quick)} quick, {len(b.cpu_cases)} on the CPU; providers: "
              f"{', '.join(p.name + (' (secondary)' if p.secondary else '') for p in b.providers)}")
        reason = b.available()
        if reason:
            print(f"{'':<20} not available: {reason}")


def _row(bench, case, provider, status, note=""):
    label = bench.label(case) if case else "-"
    return {"benchmark": bench.name, "issue": bench.issue, "case": label,
            "params": case or {}, "provider": provider, "status": status, "note": note, "ms": None, "timer": "",
            "ms_launch": None, "tflops": None, "gbps": None, "items_per_s": None, "matmul_frac": None,
            "copy_frac": None, "speedup": None, "parity_err": None, "parity_tol": None, "peak_mib": None,
            "_key": f"{bench.name}|{label}"}


def registered_order(plan, device) -> dict:
    """``(benchmark, repr(case), provider) -> (benchmark index, case index, provider index)``: where each row goes in
    the output (the benchmark's ``n/a`` row, with case ``{}`` and provider "-", first)."""
    order = {}
    for i, (bench, _, cases) in enumerate(plan):
        order[bench.name, repr({}), "-"] = (i, -1, -1)
        for j, case in enumerate(cases):
            for k, p in enumerate(bench.providers_for(device)):
                order.setdefault((bench.name, repr(case), p.name), (i, j, k))
    return order


def run_quick(session, runnable, left, save):
    """--quick's three passes over ``runnable`` ((benchmark, case index, case) in registered order), calling
    ``save()`` after each case. Pass A (headline providers that compile nothing) runs under ``session.left`` (the
    cap less the compiled pass's share), pass B (compiled headline providers, first cases, ``COMPILED_ORDER``) and
    pass C (secondary providers) under ``left``. Passes A and C go round by round: every benchmark's first case,
    then every benchmark's second case, and so on."""
    by_round = sorted(runnable, key=lambda r: r[1])  # stable: each round in registered order
    ours_ran = {}  # (benchmark, case index) -> whether a dlcv_fast provider ran; None: pass A never started it
    for bench, index, case in by_round:
        providers = bench.providers_for(session.device)
        started = session.left() > 0
        ran = session.run_case(bench, case, [p for p in providers if not p.secondary and not p.compiled])
        ours_ran[bench.name, index] = ran if started else None
        for p in providers if index else []:
            if p.compiled:
                session.emit(_row(bench, case, p.name, "skipped", "--quick: compiled providers on the first case only"))
        save()
    session.left = left
    rank = {name: i for i, name in enumerate(COMPILED_ORDER)}
    first_cases = [r for r in by_round if r[1] == 0]
    for bench, _, case in sorted(first_cases, key=lambda r: rank.get(r[0].name, len(rank))):
        compiled = [p for p in bench.providers_for(session.device) if not p.secondary and p.compiled]
        if compiled:
            ours_ran[bench.name, 0] = session.run_case(bench, case, compiled, bool(ours_ran[bench.name, 0]))
            save()
    for bench, index, case in by_round:
        secondary = [p for p in bench.providers_for(session.device) if p.secondary and not (p.compiled and index)]
        if not secondary:
            continue
        if ours_ran[bench.name, index] is None:  # the cap stopped pass A before this case: nothing to add to
            for p in secondary:
                session.emit(_row(bench, case, p.name, "skipped", SECONDARY_CAP_NOTE))
        else:
            session.run_case(bench, case, secondary, ours_ran[bench.name, index], cap_note=SECONDARY_CAP_NOTE)
        save()


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    device = runner.pick_device(args.device)
    benches = registry.benchmarks(args.suite, args.only)
    if args.list:
        list_benchmarks(benches)
        return 0
    if args.plot:
        paths = report.replot(args.plot, args.out, benches)
        print(f"wrote {', '.join(str(p) for p in paths) or 'no plots'}")
        return 0
    limit = args.time_limit if args.time_limit is not None else (
        QUICK_TIME_LIMIT_S if args.quick and device == "cuda" else None)
    left = (lambda: limit - (time.monotonic() - start)) if limit else (lambda: float("inf"))
    runner.allow_many_recompiles()

    env = report.environment(device)
    print(f"dlcv_fast benchmarks: {env['gpu'] or 'CPU'} driver {env['driver'] or '-'}, torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit'][:12]}, {env['date']}", flush=True)
    notes = []

    def note(text):
        notes.append(text)
        print(f"NOTE: {text}", flush=True)

    if device != "cuda":
        note("no CUDA device: kernel timings need a CUDA device; this run times the CPU fallback "
             "(dlcv_fast's reference backend against torch and the reference libraries) at tiny sizes")
    plan = [(b, b.available(), b.cases_for(device, args.quick)) for b in benches]
    workers = args.warm_workers if args.warm_workers is not None else warm.default_workers(device, args.quick)
    warmed, items = set(), []
    if workers > 0:  # before anything is timed: the workers share the GPU
        budget = args.warm_budget if args.warm_budget is not None else (
            min(warm.WARM_BUDGET_S, warm.WARM_CAP_SHARE * limit) if limit else 10 * warm.WARM_BUDGET_S)
        items = warm.plan_items(plan, device, args.quick)
        warmed = warm.warm(items, workers, budget, device, args.quick, log=lambda line: print(line, flush=True))
        note(f"warm-up before timing (benchmarks/warm.py): {workers} processes built and called {len(warmed)} of "
             f"{len(items)} provider x case items once, filling the Triton and torch.compile caches; its time "
             "counts against the cap")
    # With --quick and a cap, the first pass (everything but the compiled providers) leaves the compiled pass a
    # share: a smaller one when the warm-up compiled all of them (what is left is tracing and loading the caches).
    compiled_share = QUICK_COMPILED_SHARE_S
    if warmed and all(warm.item_key(it["bench"], it["label"], it["provider"]) in warmed
                      for it in items if it["compiled"]):
        compiled_share = WARMED_COMPILED_SHARE_S
    share = compiled_share if args.quick and limit and limit > 2 * compiled_share else 0
    first_left = lambda: left() - share
    if args.quick:
        note("--quick: headline shapes only, in three passes: the headline providers of every benchmark (ours and "
             "the peers the issues' targets name; every benchmark's first case, then its second, ...), then the "
             "compiled ones (FlexAttention, torch.compile) on each benchmark's first case only, then the secondary "
             "providers (variants of ours, slow baselines)" + (
                 f"; time cap {limit:.0f} s (the first pass stops {share:.0f} s before it), "
                 "work past it reported as skipped" if limit else ""))
    roof = runner.roofline(device, args.quick)
    print(f"ceilings measured now: {roof['matmul_tflops']:.4g} TFLOP/s ({roof['matmul']} matmul), "
          f"{roof['copy_gbps']:.4g} GB/s ({roof['copy']})", flush=True)

    total = sum(1 if reason or not cases else len(cases) * len(b.providers_for(device)) for b, reason, cases in plan)
    settings = {"suite": args.suite, "quick": args.quick, "device": device, "time_limit_s": limit,
                "only": args.only, "warm_workers": workers, "warmed_items": len(warmed)}
    session = Session(device, args.quick, first_left, roof, total, start, warmed)
    order = registered_order(plan, device)

    def save():  # after every case, so that partial results survive a kill
        session.rows.sort(key=lambda r: order.get((r["benchmark"], repr(r["params"]), r["provider"]), (len(plan),)))
        report.add_speedups(session.rows)
        return report.write_files(args.out, env, roof, settings, notes, session.rows)

    runnable = []
    for bench, reason, cases in plan:
        if reason or not cases:
            session.emit(_row(bench, None, "-", "n/a", reason or f"no shapes for device {device}"))
        else:
            runnable += [(bench, index, case) for index, case in enumerate(cases)]
    if args.quick:
        run_quick(session, runnable, left, save)
    else:
        for bench, _, case in runnable:
            session.run_case(bench, case, bench.providers_for(device))
            save()

    rows = session.rows
    paths = save()
    plot_paths = report.plots(args.out, benches, rows, env)
    paths += plot_paths
    if args.save_results if args.save_results is not None else device == "cuda":
        paths += report.save_results(args.out, env, plot_paths)
    print(report.table(rows))
    profiles = report.profile_table(rows)
    if profiles:
        print(profiles)
    skipped = sum(r["status"] == "skipped" for r in rows)
    if skipped:
        print(f"\n{skipped} rows skipped by the time cap or the --quick rules (see their notes)")
    for n in notes:
        print(f"NOTE: {n}")
    print(f"\nwrote {', '.join(str(p) for p in paths)}  ({time.monotonic() - start:.0f} s)", flush=True)
    ours_bad = [r for r in rows if r["provider"].startswith(report.OURS) and r["status"] in ("failed", "parity-fail")]
    for r in ours_bad:
        print(f"FAILED: {r['benchmark']} | {r['case']} | {r['provider']}: {r['status']} {r['note']}", file=sys.stderr)
    return 1 if ours_bad and device == "cuda" else 0


class Session:
    """The rows of one run, its progress count and time cap."""

    def __init__(self, device, quick, left, roof, total, start, warmed=()):
        self.device, self.quick, self.left, self.roof, self.total = device, quick, left, roof, total
        self.start = start
        self.warmed = set(warmed)  # item keys (warm.item_key) the warm-up workers built and called
        self.rows = []

    def emit(self, row):
        self.rows.append(row)
        print(report.progress_line(len(self.rows), self.total, row, time.monotonic() - self.start), flush=True)

    def compile_reserve(self, bench, case, provider) -> int:
        warmed = warm.item_key(bench.name, bench.label(case), provider.name) in self.warmed
        return WARMED_COMPILE_RESERVE_S if warmed else COMPILE_RESERVE_S

    def run_case(self, bench, case, providers, ours_ran=None, cap_note="time cap") -> bool:
        """Parity-check and time ``providers`` (ours listed first) on one case, one row each; returns whether a
        dlcv_fast provider ran. When none can (op not landed, shape unsupported; ``ours_ran`` False from an
        earlier pass), the peers are skipped: there is nothing to compare them with. Providers past the time
        cap get a skipped row noted ``cap_note``. The inputs and the parity reference are built anew for each
        call, so a case run in several passes (--quick) builds them once per pass."""
        ours = [p for p in providers if p.name.startswith(report.OURS)]
        if ours_ran is None:
            ours_ran = not ours  # with no dlcv_fast provider on this device, the peers run on their own
        if self.left() <= 0:
            for p in providers:
                self.emit(_row(bench, case, p.name, "skipped", cap_note))
            return ours_ran
        try:
            run = runner.CaseRun(bench, case, self.device)
        except Exception as e:  # e.g. out of memory for the inputs: every provider of the case fails alike
            for p in providers:
                self.emit(_row(bench, case, p.name, "failed", f"inputs: {runner.short_error(e)}"))
            return ours_ran
        for p in providers:
            row = _row(bench, case, p.name, "skipped")
            if self.left() <= 0:
                row["note"] = cap_note
            elif p not in ours and not ours_ran:
                row["note"] = "no dlcv_fast provider can run this case: nothing to compare with"
            elif p.compiled and self.left() < (reserve := self.compile_reserve(bench, case, p)):
                row["note"] = f"time cap: under {reserve} s left for a torch.compile warm-up"
            else:
                row.update(measure(run, p, self.quick, self.roof, profile=bench.profile and not p.compiled))
                ours_ran = ours_ran or (p in ours and row["status"] != "n/a")
            self.emit(row)
        del run
        # The case's inputs and models go (a full collect frees what cycles held), then whatever survived it
        # (modules the case imported: timm, transformers, ... ~400k objects; the compile caches) is frozen: out
        # of every later collection's sight, so a collect takes ~1 ms instead of 0.1-0.2 s after each of ~100
        # cases, and Python's own collections during timed calls get as cheap. A frozen cycle that becomes
        # garbage later (a compile cache evicting an entry) is not freed: a small leak in a process that ends
        # with the run.
        gc.collect()
        gc.freeze()
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return ours_ran


def measure(run, provider, quick, roof, profile=False) -> dict:
    trial = run.trial(provider)
    out = {"status": trial.status, "note": trial.note, "parity_err": trial.parity_err, "parity_tol": trial.parity_tol}
    if trial.fn is None:
        return out
    try:
        ms, timer, ms_launch, why = runner.time_call(run.caller(trial.fn), run.device, quick)
    except torch.cuda.OutOfMemoryError:
        return {**out, "status": "failed", "note": "out of memory while timing"}
    except Exception as e:
        return {**out, "status": "failed", "note": f"while timing: {runner.short_error(e)}"}
    try:
        out["peak_mib"] = runner.peak_memory_mib(run.caller(trial.fn), run.device)
    except Exception as e:  # extra information, like the profile: its failure does not fail the row
        why = "; ".join(n for n in (why, f"memory not measured: {runner.short_error(e)}") if n)
    if profile:
        try:
            out["_profile"] = runner.kernel_breakdown(run.caller(trial.fn), run.device)
        except Exception as e:  # the profile is extra information: its failure does not fail the row
            why = "; ".join(n for n in (why, f"profile failed: {runner.short_error(e)}") if n)
    if why:
        out["note"] = "; ".join(n for n in (out["note"], why) if n)
    return {**out, "ms": ms, "timer": timer, "ms_launch": ms_launch,
            **runner.metrics(run.bench, run.case, run.dtype, ms, roof)}


if __name__ == "__main__":
    sys.exit(main())
