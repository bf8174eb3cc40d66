#!/usr/bin/env bash
# One GPU, nine minutes (bench/gpu.py's docstring says what runs and why). The command, on
# the GPU machine from the repository root, after `pip install --target /tmp/site ...`
# (fairseq and its wheels) and with bench/work/multi30k/data-bin carried over:
#
#   export PYTHONPATH=/tmp/site:$PWD
#   PYTHON=python3 bash bench/gpu.sh /tmp/gpu-bench --results "$OUT/results" --archive "$OUT/gpu-runs.tar.gz"
#
# $1 (or $BENCH_OUT, or bench/work/gpu) holds the runs; the tables go to --results (default
# bench/results) and to $1/results. Afterwards copy the returned results/gpu* into
# bench/results/. Further arguments go to gpu.py (--budget-minutes, --skip-cost,
# --preset tiny for a CPU smoke test with --data DATA_BIN).
set -u
out=${1:-${BENCH_OUT:-bench/work/gpu}}
shift || true
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu.py" --out "$out" "$@"
