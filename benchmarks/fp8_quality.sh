#!/usr/bin/env bash
# bf16 vs fp8 training quality on one GPU (issue 18): the same 1.3B model, seed and tokens through the CLI,
# then benchmarks/loss_compare.py compares the loss curves (PNG + JSON + Markdown in OUT).
#   bash benchmarks/fp8_quality.sh OUT [STEPS]
# data/stream comes from benchmarks/streaming_corpus.py, `megatron-sep tokenizer train` and `preprocess`.
set -euo pipefail
out=$1 steps=${2:-300}
source "$(dirname "$0")/run_guard.sh"
fresh_runs "this script removes its checkpoints" runs/fp8_quality_bf16 runs/fp8_quality_fp8
fresh_out "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
for precision in bf16 fp8; do
  run=runs/fp8_quality_$precision
  python3 -m megatron_sep train --config configs/llama1.3b_text.yaml --set train.precision=$precision \
    --set train.run_dir=$run --set train.steps="$steps" 2>&1 | tee "$out/train_$precision.log"
  cp $run/metrics.jsonl "$out/metrics_$precision.jsonl"
  rm -rf $run/checkpoints  # 16 GB each; the GPU tests check fp8 checkpoints at a small size
done
python3 benchmarks/loss_compare.py "$out/metrics_bf16.jsonl" "$out/metrics_fp8.jsonl" --labels bf16,fp8 \
  --name fp8_quality --out "$out"
