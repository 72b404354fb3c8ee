#!/usr/bin/env bash
# Speculative decoding on one GPU (issue 24): trains the ~344M target (configs/llama350m_text.yaml) and its
# 4-layer draft (configs/draft4_text.yaml) on data/stream with the normal trainer, then decodes held-out
# prompts with the target alone and with the draft (benchmarks/speculative_decoding.py): with CUDA graphs at
# every k (OUT/graphs), then eagerly at k=4 (OUT/eager).
#   bash benchmarks/speculative_decoding.sh OUT [TARGET_STEPS] [DRAFT_STEPS]
# data/stream comes from benchmarks/streaming_corpus.py, `megatron-sep tokenizer train` and `preprocess`.
set -euo pipefail
out=$1 tsteps=${2:-400} dsteps=${3:-400}
source "$(dirname "$0")/run_guard.sh"
fresh_runs "this script trains both anew (decode existing runs with benchmarks/speculative_decoding.py)" runs/spec_target runs/spec_draft
fresh_out "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m megatron_sep train --config configs/llama350m_text.yaml --set train.run_dir=runs/spec_target \
  --set train.steps="$tsteps" --set checkpoint.save_interval="$tsteps" 2>&1 | tee "$out/train.log"
python3 -m megatron_sep train --config configs/draft4_text.yaml --set train.run_dir=runs/spec_draft \
  --set train.steps="$dsteps" --set checkpoint.save_interval="$dsteps" 2>&1 | tee -a "$out/train.log"
python3 benchmarks/speculative_decoding.py --target runs/spec_target --draft runs/spec_draft --out "$out/graphs" \
  --cuda-graphs 2>&1 | tee "$out/decode.log"
python3 benchmarks/speculative_decoding.py --target runs/spec_target --draft runs/spec_draft --out "$out/eager" \
  --k 4 2>&1 | tee -a "$out/decode.log"
