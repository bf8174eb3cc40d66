#!/usr/bin/env bash
# What does GradInit's constraint (||g||_1 <= gamma) do on Multi30k? bench/stability.py
# at two learning rates, 3 seeds, the exact second-order step (--gradinit-second-order
# autograd), these GradInit settings side by side with vanilla and warmup Post-LN:
#   rel125     gamma 1.25 x the first iteration's l1 norm, 80 iterations, tau 1.5e-2
#   g2400      gamma 2400 (about 0.2 x the initial l1 norm of ~1.2e4), same budget
#   g480       gamma 480 (0.04 x: the authors' 1000 for ~2.5e4), same budget
#   g480-780   gamma 480 at the paper's budget: 780 iterations, tau 2.5e-3
# Made for one GPU (each run is its own fairseq-train; JOBS at once per lr):
#   bash bench/constraint_sweep.sh OUT_DIR [JOBS]
# then bench/results/constraint-lr*.md are OUT_DIR/lr*/results.md.
set -uo pipefail
out=${1:?usage: bench/constraint_sweep.sh OUT_DIR [JOBS]}
jobs=${2:-6}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
exact="--gradinit-second-order autograd"
for lr in 1e-3 3e-3; do
  ${PYTHON:-python3} "$here/stability.py" --out "$out/lr$lr" --lr "$lr" --seeds 3 --jobs "$jobs" \
    --methods gradinit-g480-780,vanilla,warmup,gradinit-rel125,gradinit-g2400,gradinit-g480 \
    --variant "g480-780=--gradinit-gamma 480 --gradinit-iters 780 --gradinit-lr 2.5e-3 $exact" \
    --variant "rel125=$exact" \
    --variant "g2400=--gradinit-gamma 2400 $exact" \
    --variant "g480=--gradinit-gamma 480 $exact" \
    > "$out/lr$lr.log" 2>&1 &
done
wait
tail -n 40 "$out"/lr*/results.md
