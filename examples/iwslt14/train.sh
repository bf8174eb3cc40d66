#!/usr/bin/env bash
# IWSLT'14 De-En training recipes: the GradInit paper's Table 2 rows that run in fairseq.
#
#   examples/iwslt14/train.sh METHOD DATA_BIN SAVE_DIR [--seed N] [--lr X] [--beta2 Y]
#                             [--max-update N] [--cpu] [--small] [fairseq-train flags...]
#
# METHOD (all Post-LN transformer_iwslt_de_en, 6+6 layers, 512 wide, FFN 1024, 4 heads):
#   vanilla-warmup    Adam, 4000 warmup updates (inverse_sqrt), no GradInit
#   vanilla           Adam, no warmup (linear decay from max lr) - the failure case, on purpose
#   gradinit-adam     GradInit (Adam target) + Adam, no warmup
#   gradinit-sgd      GradInit (SGD target, eta 0.15, gamma 1) + SGD momentum 0.9, lr 0.15, no warmup
#   gradinit-wskip    GradInit + Adam on transformer_wskip_iwslt_de_en (w_skip = 1), no warmup
#   admin             Admin: transformer_wskip_iwslt_de_en --wskip-init admin, Adam, no warmup
#
# Paper settings: linear decay from max lr to 0 over 100k updates (--max-update N changes
# both the run length and the decay horizon), max-tokens 4096, dropout 0.3, label smoothing
# 0.1, weight decay 1e-4, Adam betas (0.9, --beta2 = 0.98), lr 5e-4 (Adam) / 0.15 (SGD),
# shared decoder input/output embeddings. GradInit: 780 iterations, scale lr 2.5e-3 and,
# for the Adam methods, eta = 2 x lr (the authors' release; eta = lr for SGD).
#
# --small: a CPU-sized configuration for smoke tests on any prepared data: narrow 6+6
# Post-LN (256 wide, 4 heads, FFN 1024), 300 updates, 80 GradInit iterations at scale lr
# 1.5e-2 (bench/stability.py: enough to move the scales in a short run), warmup 30
# for vanilla-warmup; validation every 100 updates.
# --cpu: run on CPU. Flags after the known ones go to fairseq-train last (they win).
# The whole log is written to SAVE_DIR/train.log, the settings to SAVE_DIR/run.json.
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
}
[ $# -ge 3 ] || usage
method=$1 data=$2 save=$3
shift 3

seed=1 lr="" beta2=0.98 max_update="" small=0 cpu=()
extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --seed) seed=$2; shift 2 ;;
        --lr) lr=$2; shift 2 ;;
        --beta2) beta2=$2; shift 2 ;;
        --max-update) max_update=$2; shift 2 ;;
        --cpu) cpu=(--cpu); shift ;;
        --small) small=1; shift ;;
        *) extra+=("$1"); shift ;;
    esac
done

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
train=${FAIRSEQ_TRAIN:-$root/.venv/bin/fairseq-train}
[ -x "$train" ] || train=fairseq-train
python=$root/.venv/bin/python
[ -x "$python" ] || python=python3

if [ ! -f "$data/dict.de.txt" ] && ! ls "$data"/dict.*.txt >/dev/null 2>&1; then
    echo "error: $data has no fairseq dictionary (run examples/iwslt14/prepare.py first)" >&2
    exit 2
fi

arch=transformer_iwslt_de_en
case $method in
    vanilla-warmup|vanilla|gradinit-adam|gradinit-sgd) ;;
    gradinit-wskip|admin) arch=transformer_wskip_iwslt_de_en ;;
    *) echo "error: unknown METHOD '$method' (vanilla-warmup, vanilla, gradinit-adam, gradinit-sgd, gradinit-wskip, admin)" >&2; exit 2 ;;
esac

if [ $small = 1 ]; then
    default_updates=300
    case $arch in transformer_iwslt_de_en) arch=transformer ;; *) arch=transformer_wskip ;; esac
    model=(--arch "$arch" --encoder-layers 6 --decoder-layers 6
           --encoder-embed-dim 256 --decoder-embed-dim 256
           --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024
           --encoder-attention-heads 4 --decoder-attention-heads 4)
    gi_iters=(--gradinit-iters 80 --gradinit-lr 1.5e-2)
    warmup=30
    interval=(--log-interval 10 --validate-interval-updates 100 --save-interval-updates 100
              --keep-interval-updates 1)
else
    default_updates=100000
    model=(--arch "$arch")
    gi_iters=()
    warmup=4000
    interval=(--log-interval 100)
fi
max_update=${max_update:-$default_updates}

optim=(--optimizer adam --adam-betas "(0.9,$beta2)")
lr_given=$lr
[ -n "$lr" ] || lr=5e-4
# GradInit's virtual Adam step: 2 x lr, the authors' IWSLT'14 release (eta 1e-3, lr 5e-4).
eta2=$(awk "BEGIN { print 2 * $lr }")
linear=(--lr-scheduler polynomial_decay --power 1 --warmup-updates 0
        --total-num-update "$max_update")
case $method in
    vanilla-warmup) sched=(--lr-scheduler inverse_sqrt --warmup-updates "$warmup" --warmup-init-lr 1e-7); gi=() ;;
    vanilla)        sched=("${linear[@]}"); gi=() ;;
    gradinit-adam)  sched=("${linear[@]}"); gi=(--gradinit "${gi_iters[@]}" --gradinit-eta "$eta2") ;;
    gradinit-sgd)
        [ -n "$lr_given" ] || lr=0.15
        optim=(--optimizer sgd --momentum 0.9)
        sched=("${linear[@]}"); gi=(--gradinit "${gi_iters[@]}") ;;
    gradinit-wskip) sched=("${linear[@]}"); gi=(--gradinit "${gi_iters[@]}" --gradinit-eta "$eta2") ;;
    admin)          sched=("${linear[@]}"); gi=(--wskip-init admin) ;;
esac

mkdir -p "$save"
# run.json: what collect.py groups seeds by (everything but the seed and --save-dir).
"$python" - "$save/run.json" "$method" "$lr" "$beta2" "$seed" "$max_update" "$small" "${extra[@]}" <<'EOF'
import json, sys
path, method, lr, beta2, seed, max_update, small, *extra = sys.argv[1:]
json.dump({"method": method, "lr": float(lr),
           "beta2": None if method == "gradinit-sgd" else float(beta2), "seed": int(seed),
           "max_update": int(max_update), "small": small == "1", "extra": extra},
          open(path, "w"), indent=1)
EOF

cmd=("$train" "$data" --user-dir "$root/fairseq_gradinit"
     "${model[@]}" --share-decoder-input-output-embed
     "${optim[@]}" --lr "$lr" --weight-decay 1e-4 --clip-norm 0
     "${sched[@]}" --max-update "$max_update"
     --dropout 0.3 --criterion label_smoothed_cross_entropy --label-smoothing 0.1
     --max-tokens 4096 --seed "$seed"
     --no-epoch-checkpoints --no-progress-bar --log-format simple "${interval[@]}"
     "${gi[@]}" "${cpu[@]}" --save-dir "$save" "${extra[@]}")
printf '%q ' "${cmd[@]}" > "$save/command.sh"; echo >> "$save/command.sh"
echo "+ $(cat "$save/command.sh")" | tee "$save/train.log"
set +e
PYTHONUNBUFFERED=1 "${cmd[@]}" 2>&1 | tee -a "$save/train.log"
rc=${PIPESTATUS[0]}
exit "$rc"
