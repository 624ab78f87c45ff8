#!/usr/bin/env bash
# Trains the mid-size BLT on one GPU for a few minutes (both stages) and keeps the metrics.
# Results: experiments/results/train_blt_mid.md.
#   bash experiments/benchmarks/train_mid_gpu.sh [OUT_DIR] [BLT_STEPS] [ENTROPY_STEPS]
set -euo pipefail
out=${1:-/tmp/fastblt-mid-results}
steps=${2:-500}
entropy_steps=${3:-300}
mkdir -p "$out"
workdir=$(mktemp -d /tmp/fastblt-mid.XXXX)
PYTHONUNBUFFERED=1 python3 -m fastblt.cli train --config blt_mid --workdir "$workdir" \
  --config.train.steps="$steps" --config.entropy_stage.steps="$entropy_steps" \
  --config.train.log_every=25 --config.train.eval_every=250 2>&1 | grep -v '^W[0-9]' | tee "$out/train_log.txt"
cp "$workdir/blt/tensorboard/metrics.jsonl" "$out/blt_metrics.jsonl"
cp "$workdir/entropy/tensorboard/metrics.jsonl" "$out/entropy_metrics.jsonl"
