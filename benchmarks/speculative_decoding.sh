#!/usr/bin/env bash
# Speculative decoding on one GPU (issue 24): trains the ~344M target (configs/llama350m_text.yaml) and three
# drafts with the normal trainer on data/stream: the 4-layer draft (configs/draft4_text.yaml) on the data, the
# same draft distilled from the target (train.distill_from), and the 2-layer distilled draft
# (configs/draft2_distill_text.yaml). Then decodes held-out
# prompts with the target alone and with each draft, with CUDA graphs (benchmarks/speculative_decoding.py):
# OUT/draft4, OUT/draft4_distilled, OUT/draft2_distilled, and all three against k in OUT/drafts.png; logs
# OUT/train.log and OUT/decode.log.
#   bash benchmarks/speculative_decoding.sh OUT [TARGET_STEPS] [DRAFT_STEPS]
# data/stream comes from benchmarks/streaming_corpus.py, `megatron-sep tokenizer train` and `preprocess`.
set -euo pipefail
out=$1 tsteps=${2:-400} dsteps=${3:-400}
source "$(dirname "$0")/run_guard.sh"
runs=(runs/spec_target runs/spec_draft4 runs/spec_draft4_distilled runs/spec_draft2_distilled)
fresh_runs "this script trains them anew (decode existing runs with benchmarks/speculative_decoding.py)" "${runs[@]}"
fresh_out "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
train() {  # CONFIG RUN_DIR STEPS [--set ...]
  local config=$1 run=$2 steps=$3
  shift 3
  python3 -m megatron_sep train --config "$config" --set train.run_dir="$run" --set train.steps="$steps" \
    --set checkpoint.save_interval="$steps" "$@" 2>&1 | tee -a "$out/train.log"
}
train configs/llama350m_text.yaml runs/spec_target "$tsteps"
train configs/draft4_text.yaml runs/spec_draft4 "$dsteps"
train configs/draft4_text.yaml runs/spec_draft4_distilled "$dsteps" --set train.distill_from=runs/spec_target
train configs/draft2_distill_text.yaml runs/spec_draft2_distilled "$dsteps" --set train.distill_from=runs/spec_target
for draft in draft4 draft4_distilled draft2_distilled; do
  python3 benchmarks/speculative_decoding.py --target runs/spec_target --draft "runs/spec_$draft" \
    --out "$out/$draft" --cuda-graphs 2>&1 | tee -a "$out/decode.log"
done
python3 benchmarks/speculative_compare.py --out "$out/drafts.png" "2 layers, distilled=$out/draft2_distilled" \
  "4 layers, distilled=$out/draft4_distilled" "4 layers, on the data=$out/draft4"
