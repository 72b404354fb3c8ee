#!/usr/bin/env bash
# SUBLLM against dense on real text (issue 23): the Llama 1.3B shape of configs/llama1.3b_text.yaml, same seed
# and batches, one through the plain blocks and one through TTTTT(TTTTT(TTTT)TTTTT)TTTTT at keep 0.64 (the
# bypass minimum falls over the whole run); benchmarks/loss_compare.py plots both curves (PNG + JSON + Markdown).
#   bash benchmarks/subllm_quality.sh OUT [STEPS]
# data/stream comes from benchmarks/streaming_corpus.py, `megatron-sep tokenizer train` and `preprocess`.
set -euo pipefail
out=$1 steps=${2:-300}
source "$(dirname "$0")/run_guard.sh"
fresh_runs "this script removes its checkpoints" runs/subllm_quality_dense runs/subllm_quality_subllm
fresh_out "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
for v in dense subllm; do
  run=runs/subllm_quality_$v
  extra=()
  if [ $v = subllm ]; then
    extra=(--set model.structure='TTTTT(TTTTT(TTTT)TTTTT)TTTTT' --set model.subsample_keep=0.64
           --set model.bypass_warmup_steps="$steps")
  fi
  python3 -m megatron_sep train --config configs/llama1.3b_text.yaml --set train.run_dir=$run \
    --set train.steps="$steps" "${extra[@]}" 2>&1 | tee "$out/train_$v.log"
  cp $run/metrics.jsonl "$out/metrics_$v.jsonl"
  rm -rf $run/checkpoints
done
python3 benchmarks/loss_compare.py "$out/metrics_dense.jsonl" "$out/metrics_subllm.jsonl" --labels dense,subllm \
  --name subllm_quality --seq-len 4096 --out "$out"
