#!/usr/bin/env bash
# GradInit + Adam, Post-LN Transformer, no warmup: the paper's IWSLT'14 De-En row (Table 2).
#   examples/iwslt14/train_gradinit_adam.sh DATA_BIN SAVE_DIR [more fairseq-train flags]
# DATA_BIN: fairseq-preprocess output with a joined dictionary (examples/prepare_data.py).
# Paper settings: lr 5e-4 decayed linearly to 0 over 100k updates, max-tokens 4096,
# dropout 0.3, label smoothing 0.1, weight decay 1e-4; GradInit defaults (780 iterations,
# eta = lr, scale lr 2.5e-3) come from the plugin. Later flags override earlier ones.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 DATA_BIN SAVE_DIR [fairseq-train flags...]" >&2
    exit 2
fi
data=$1 save=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
train=${FAIRSEQ_TRAIN:-$root/.venv/bin/fairseq-train}
[ -x "$train" ] || train=fairseq-train
exec "$train" "$data" --user-dir "$root/fairseq_gradinit" --gradinit \
    --arch transformer_iwslt_de_en --share-decoder-input-output-embed \
    --optimizer adam --adam-betas '(0.9,0.98)' --lr 5e-4 --weight-decay 1e-4 \
    --lr-scheduler polynomial_decay --power 1 --total-num-update 100000 --max-update 100000 \
    --warmup-updates 0 --dropout 0.3 \
    --criterion label_smoothed_cross_entropy --label-smoothing 0.1 --max-tokens 4096 \
    --save-dir "$save" "$@"
