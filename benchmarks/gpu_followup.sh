#!/usr/bin/env bash
# The second device call of a GPU session, after `bash .devcheck/run.sh all`: the config sweeps that decide
# the off-by-default switches, most telling first (wsfwd: whether Triton's warp specialization pays on Hopper,
# benchmarks/ws_probe.py; rope64/rope128: rope= by the two passes against RoPE inside the forward kernel;
# table: the shipped backward tiles against key-major and TMA loads; fwd: forward tiles, tail block, exp2
# split, K/V by TMA; split: short key sides; window; linear: the Linear + GELU GEMM against cuBLAS), within a
# time limit, rows and summary written under $OUT. Works on a warm
# machine (the project already installed) and on a fresh one (installs the carried wheels and the project
# first, as run.sh does).
#
# Before the sweeps, BENCH (benchmark names, comma-separated; "none" skips it) runs in full, every case and
# provider (not --quick), within half the time: by default the window attention benchmarks, whose issue-4 goal
# against FlexAttention covers all four Swin cases while --quick compiles FlexAttention on the first only.
#
#   bash benchmarks/gpu_followup.sh [SECONDS] [GROUPS] [BENCH]  # defaults: 420, wsfwd,rope64,rope128,table,fwd,split,window,linear, window_attn
set -uo pipefail
limit=${1:-420}
groups=${2:-wsfwd,rope64,rope128,table,fwd,split,window,linear}
bench=${3:-window_attn}
out=${OUT:-/tmp/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
if ! python3 -c "import dlcv_fast.kernels.attention" >/dev/null 2>&1; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  timeout 150 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || echo "== install FAILED"
fi
echo "== $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null), commit" \
     "$(git rev-parse --short HEAD 2>/dev/null), set-up $(( $(date +%s) - t0 )) s"
if [[ $bench != none ]]; then
  share=$(( (limit - ($(date +%s) - t0)) / 2 ))
  timeout $(( share + 40 )) python3 -m benchmarks --only ${bench//,/ } --time-limit "$share" --warm-workers 8 \
    --no-save-results --out "$out/bench" > "$out/bench.log" 2>&1
  echo "== benchmarks --only $bench (full cases, ${share} s cap): rc=$? ($(( $(date +%s) - t0 )) s)"
  grep -v "skipped\|^\[" "$out/bench.log" | tail -n 40
fi
left=$(( limit - ($(date +%s) - t0) ))
if (( left < 30 )); then echo "== no time left for a sweep ($left s)"; exit 1; fi
# the warm-up (each group compiled in its own process first) gets at most half of what is left
timeout "$left" python3 -m benchmarks.tune --out "$out/tune.jsonl" --only "$groups" --warm-budget $(( left / 2 )) \
  > "$out/tune.log" 2>&1
rc=$?
echo "== benchmarks.tune --only $groups: rc=$rc ($(( $(date +%s) - t0 )) s; 124 = stopped at the limit)"
grep '^#' "$out/tune.log"
if [ -s "$out/tune.jsonl" ]; then
  python3 -m benchmarks.tune --summarize "$out/tune.jsonl" | tee "$out/tune-summary.txt"
fi
exit $rc
