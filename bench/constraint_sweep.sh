#!/usr/bin/env bash
# What does GradInit's constraint (||g||_1 <= gamma) do on Multi30k? bench/stability.py,
# 3 seeds, the default (exact) second-order step, these GradInit settings side by side
# with vanilla and warmup Post-LN:
#   (default)  gamma 1.25 x the first iteration's l1 norm, 80 iterations, tau 1.5e-2
#   g2400      gamma 2400 (about 0.2 x the initial l1 norm of ~1.2e4), same budget
#   g480       gamma 480 (0.04 x: the authors' 1000 for ~2.5e4), same budget
#   g480-780   gamma 480 at the paper's budget: 780 iterations, tau 2.5e-3
# Made for one GPU (each run is its own fairseq-train; JOBS at once). PART picks what runs:
#   short     lr 1e-3 and 3e-3: vanilla, warmup, default, g2400, g480 (docs/constraint.md's tables)
#   lr2e-3    lr 2e-3: vanilla, warmup, default, g480
#   paper     lr 1e-3: g480-780 (the paper's GradInit budget)
# Each part fits one 9-minute device call on an H100 with JOBS 8 or more; a run that
# finished is not run again, so a cut part resumes when called again.
#   bash bench/constraint_sweep.sh OUT_DIR [JOBS] [PART ...]     # default: all three
# then OUT_DIR/lr*/results.md hold the tables (bench/stability.py --collect rewrites them).
set -uo pipefail
out=${1:?usage: bench/constraint_sweep.sh OUT_DIR [JOBS] [short|lr2e-3|paper ...]}
jobs=${2:-8}
shift $(( $# < 2 ? $# : 2 ))
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(short lr2e-3 paper)
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)

sweep() {  # sweep LR NAME METHODS VARIANT...
  local lr=$1 name=$2 methods=$3
  shift 3
  local variants=()
  for v in "$@"; do variants+=(--variant "$v"); done
  ${PYTHON:-python3} "$here/stability.py" --out "$out/$name" --lr "$lr" --seeds 3 --jobs "$jobs" \
    --methods "$methods" "${variants[@]}" > "$out/$name.log" 2>&1
  tail -n 30 "$out/$name/results.md"
}

for part in "${parts[@]}"; do
  case $part in
    short)
      for lr in 1e-3 3e-3; do
        sweep "$lr" "lr$lr" vanilla,warmup,gradinit,gradinit-g2400,gradinit-g480 \
          "g2400=--gradinit-gamma 2400" "g480=--gradinit-gamma 480" &
      done
      wait ;;
    lr2e-3) sweep 2e-3 lr2e-3 vanilla,warmup,gradinit,gradinit-g480 "g480=--gradinit-gamma 480" ;;
    paper) sweep 1e-3 lr1e-3-780 gradinit-g480-780 \
      "g480-780=--gradinit-gamma 480 --gradinit-iters 780 --gradinit-lr 2.5e-3" ;;
    *) echo "bench/constraint_sweep.sh: unknown part '$part' (short, lr2e-3 or paper)" >&2; exit 2 ;;
  esac
done
