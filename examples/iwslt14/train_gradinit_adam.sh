#!/usr/bin/env bash
# Kept for old commands: the same as `train.sh gradinit-adam DATA_BIN SAVE_DIR [flags...]`
# (GradInit + Adam, Post-LN, no warmup). See examples/iwslt14/README.md.
exec bash "$(cd "$(dirname "$0")" && pwd)/train.sh" gradinit-adam "$@"
