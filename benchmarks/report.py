"""Reports of a benchmark run: the environment record, the terminal table, CSV / JSON files and PNG plots."""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENV_COLUMNS = ("date", "commit", "gpu", "driver", "torch", "triton")
ROW_COLUMNS = ("benchmark", "issue", "case", "params", "provider", "status", "note", "ms", "timer", "ms_launch",
               "tflops", "gbps", "items_per_s", "matmul_frac", "copy_frac", "speedup", "parity_err", "parity_tol",
               "peak_mib")
CSV_COLUMNS = ENV_COLUMNS + ROW_COLUMNS
OURS = "dlcv_fast"
LIBRARIES = ("timm", "transformers", "diffusers", "open_clip_torch", "flash_attn", "liger_kernel", "numpy")


def _run(cmd: list) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: str) -> dict:
    """What the numbers were measured on: card, driver, versions, commit and date."""
    import triton

    commit = _run(["git", "rev-parse", "HEAD"]) or "unknown"
    if commit != "unknown" and _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += "+dirty"
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "device": device,
        "gpu": "",
        "driver": "",
        "cuda": torch.version.cuda or "",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cpu": f"{platform.machine()} x {os.cpu_count()}",
        "libraries": {},
    }
    for lib in LIBRARIES:
        try:
            env["libraries"][lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2 ** 30, 1),
                   l2_mib=round(getattr(props, "L2_cache_size", 0) / 2 ** 20, 1),
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).split("\n")[0])
    return env


# ----------------------------------------------------------------------------------------------------------
# Terminal
# ----------------------------------------------------------------------------------------------------------

def _num(v, fmt):
    return "" if v is None else format(v, fmt)


def progress_line(i: int, total: int, row: dict, elapsed_s: float) -> str:
    if row["status"] == "ok":
        launch = row.get("ms_launch")
        what = f"{row['ms']:9.4g} ms" + (f" ({launch:.4g} ms host-launched)" if row.get("timer") == "cudagraph" else "")
        what += "".join(
            f"  {row[key]:.4g} {unit}" for key, unit in (("tflops", "TFLOP/s"), ("gbps", "GB/s"),
                                                         ("items_per_s", "items/s")) if row[key] is not None)
    else:
        what = f"{row['status']}: {row['note']}"
    return f"[{i:>3}/{total} {elapsed_s:4.0f}s] {row['benchmark']} | {row['case']} | {row['provider']:<22} {what}"


def roof_pct(row: dict) -> str:
    """The row's share of the binding ceiling: the larger of its matmul and copy fractions."""
    fracs = [(f, k) for f, k in ((row["matmul_frac"], "mm"), (row["copy_frac"], "copy")) if f is not None]
    if not fracs:
        return ""
    f, k = max(fracs)
    return f"{100 * f:.0f}% {k}"


def table(rows: list) -> str:
    """The summary table, one block per benchmark."""
    head = ("case", "provider", "status", "ms", "TFLOP/s", "GB/s", "items/s", "roofline", "speedup", "peak MiB")
    lines = []
    for bench, group in _by(rows, "benchmark").items():
        body = [(r["case"], r["provider"], r["status"] if r["status"] == "ok" else f"{r['status']}: {r['note'][:60]}",
                 _num(r["ms"], ".4g"), _num(r["tflops"], ".4g"), _num(r["gbps"], ".4g"), _num(r["items_per_s"], ".4g"),
                 roof_pct(r) if r["status"] == "ok" else "", _num(r["speedup"], ".2f") + "x" if r["speedup"] else "",
                 _num(r.get("peak_mib"), ".4g"))
                for r in group]
        keep = [i for i, col in enumerate(zip(*body)) if i < 3 or any(col)]  # drop columns empty in this block
        cols = [[line[i] for i in keep] for line in (head, *body)]
        widths = [max(len(x) for x in col) for col in zip(*cols)]
        lines += ["", f"== {bench} (issue {group[0]['issue']})"]
        lines += ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in cols]
    return "\n".join(lines)


def _by(rows, key) -> dict:
    out = defaultdict(list)
    for r in rows:
        out[r[key]].append(r)
    return out


def add_speedups(rows: list):
    """speedup = time of the fastest non-dlcv_fast provider on the same case / this row's time."""
    for case_rows in _by(rows, "_key").values():
        peers = [r["ms"] for r in case_rows if r["status"] == "ok" and not r["provider"].startswith(OURS)]
        for r in case_rows:
            r["speedup"] = min(peers) / r["ms"] if peers and r["status"] == "ok" else None


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------

def profiles(rows: list) -> list:
    """The kernel breakdowns of the profiled rows (``runner.kernel_breakdown``), one entry per row."""
    return [{"benchmark": r["benchmark"], "case": r["case"], "provider": r["provider"], **r["_profile"]}
            for r in rows if r.get("_profile")]


PROFILE_LINES = 8


def profile_table(rows: list) -> str:
    """The heaviest kernels of each profiled row, as text ("" when none was profiled)."""
    parts = []
    for p in profiles(rows):
        parts.append(f"\n== where the time goes: {p['benchmark']} | {p['case']} | {p['provider']} "
                     f"({p['total_ms']:.4g} ms traced per call" + (
                         f"; untraced: host {p['host_ms']:.4g} ms, wall {p['wall_ms']:.4g} ms" if "host_ms" in p
                         else "") + ")")
        if p.get("kinds"):
            parts.append("  by kind: " + ", ".join(f"{k} {ms:.3g} ms" for k, ms in p["kinds"].items() if ms))
        for k in p["kernels"][:PROFILE_LINES]:
            parts.append(f"  {k['share']:6.1%}  {k['ms']:9.4f} ms  x{k['calls']:<6g} {k['name'][:90]}")
    return "\n".join(parts)


def write_files(out_dir: Path, env: dict, roof: dict, settings: dict, notes: list, rows: list) -> list:
    """results.json and results.csv in ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    public = [{k: r[k] for k in ROW_COLUMNS} for r in rows]
    doc = {"env": env, "roofline": roof, "settings": settings, "notes": notes, "rows": public,
           "profiles": profiles(rows)}
    paths = [out_dir / "results.json", out_dir / "results.csv"]
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    with paths[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in public:
            w.writerow({**{k: env[k] for k in ENV_COLUMNS}, **r, "params": json.dumps(r["params"])})
    return paths


def results_stem(env: dict) -> str:
    """``<UTC date>T<hhmm>_<card>``: the name of a run's files under benchmarks/results/."""
    card = re.sub(r"[^a-z0-9]+", "-", (env["gpu"] or env["device"]).lower()).strip("-")
    return f"{env['date'][:16].replace(':', '')}_{card}"


def save_results(out_dir: Path, env: dict, plot_paths=()) -> list:
    """Copy results.json / results.csv to benchmarks/results/<stem>.{json,csv} and the plots to
    benchmarks/results/<stem>/ (committed with the code; the README shows the plots)."""
    stem = results_stem(env)
    RESULTS_DIR.mkdir(exist_ok=True)
    paths = []
    for ext in ("json", "csv"):
        dst = RESULTS_DIR / f"{stem}.{ext}"
        dst.write_bytes((out_dir / f"results.{ext}").read_bytes())
        paths.append(dst)
    for src in plot_paths:
        dst = RESULTS_DIR / stem / Path(src).name
        dst.parent.mkdir(exist_ok=True)
        dst.write_bytes(Path(src).read_bytes())
        paths.append(dst)
    return paths


def replot(results_json: Path, out_dir: Path, benches: list) -> list:
    """The plots of a saved run (its results JSON, e.g. one under benchmarks/results/) drawn again into
    ``out_dir``: no GPU needed. Rows of benchmarks no longer defined are left out."""
    doc = json.loads(Path(results_json).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    return plots(out_dir, benches, doc["rows"], doc["env"])


def plots(out_dir: Path, benches: list, rows: list, env: dict) -> list:
    """One PNG per benchmark: throughput against ``bench.x`` per provider (a panel per ``bench.group`` value),
    or, without an x axis, bars per case of throughput and of speedup over the fastest peer. Returns the paths
    written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    paths = []
    by_bench = _by([r for r in rows if r["status"] == "ok"], "benchmark")
    for bench in benches:
        bench_rows = by_bench.get(bench.name)
        if not bench_rows:
            continue
        metric, unit = _metric(bench_rows[0])
        # a line per provider where the run has more than one x value (a --quick run has one: bars then)
        lines = bench.x and len({r["params"][bench.x] for r in bench_rows}) > 1
        if lines:
            groups = defaultdict(list)
            for r in bench_rows:
                groups[", ".join(f"{k}={r['params'][k]}" for k in bench.group)].append(r)
            panels = [(title, panel, metric, unit) for title, panel in groups.items()]
        else:
            panels = [("", bench_rows, metric, unit), ("", bench_rows, "speedup", "speedup vs the fastest peer")]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (title, panel, key, label) in zip(axes[0], panels):
            if lines:
                xs = sorted({r["params"][bench.x] for r in panel})
                for provider, pr in _by(panel, "provider").items():
                    pts = sorted((r["params"][bench.x], r[key]) for r in pr)
                    ax.plot(*zip(*pts), marker="o", label=provider, linewidth=2.5 if provider.startswith(OURS) else 1.2)
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(x) for x in xs])
                ax.set_xlabel(bench.x)
            else:
                _bars(ax, [r for r in panel if r[key] is not None], key)
            ax.set_title(title, fontsize=9)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(f"{bench.name}: {bench.title}\n{env['gpu'] or env['device']}, torch {env['torch']}, "
                     f"{env['date'][:10]}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{bench.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _metric(row) -> tuple:
    for key, unit in (("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("items_per_s", "items/s")):
        if row[key] is not None:
            return key, unit
    return "ms", "ms"


def _bars(ax, rows, metric):
    cases = list(dict.fromkeys(r["case"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    if not providers:  # e.g. no speedup: the only peer failed or was skipped
        ax.text(0.5, 0.5, f"no {metric} to plot", ha="center", va="center", transform=ax.transAxes)
        return
    width = 0.8 / len(providers)
    for j, provider in enumerate(providers):
        vals = {r["case"]: r[metric] for r in rows if r["provider"] == provider}
        xs = [i + j * width for i, c in enumerate(cases) if c in vals]
        ax.bar(xs, [vals[c] for c in cases if c in vals], width, label=provider)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(["\n".join(textwrap.wrap(c, 16)) for c in cases], fontsize=7)
