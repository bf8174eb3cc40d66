#!/usr/bin/env bash
# One GPU, nine minutes (bench/gpu.py's docstring says what runs). The lead's command, on
# the GPU machine from the repository root, after installing fairseq and its wheels with
# `pip install --target /tmp/site ...` and carrying bench/work/multi30k/data-bin:
#
#   export PYTHONPATH=/tmp/site:$PWD; PYTHON=python3 bash bench/gpu.sh "$OUT/gpu"
#
# Everything goes under the directory given as $1 (or $BENCH_OUT, or bench/work/gpu): the
# runs in runs/, the tables in results/ (also written to bench/results/). Copy
# "$OUT/gpu/results/gpu*" into bench/results/ afterwards. Further arguments go to gpu.py
# (e.g. --budget-minutes 8, --skip-cost, --preset tiny for a CPU smoke test).
set -u
out=${1:-${BENCH_OUT:-bench/work/gpu}}
shift || true
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu.py" --out "$out" "$@"
