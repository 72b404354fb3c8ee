#!/usr/bin/env bash
# The SepLLM paper's five runs (configs/experiments/sepllm_paper.yaml, Pythia-160M shape, seq 2048) on the
# offline corpus (`megatron-sep offline-corpus`), compiled, on one GPU; issue 34. Resumable: call it again with
# the same SWEEP and TOKENS and other runs; finished runs are skipped, each call ends with the report of every
# finished run, and OUT gets one archive of what a CPU needs to rebuild the report (no checkpoints).
#   bash benchmarks/paper_sweep.sh SWEEP TOKENS RUNS OUT [DATA [--set ... | --allow-repeat]]
#   e.g. bash benchmarks/paper_sweep.sh runs/sweeps/paper 60M vanilla,sepllm_n128 $OUT .carry/offline
# DATA holds tokenizer.model and train_text_document.{bin,idx} (or .bin.xz, unpacked here): the corpus, or the
# subset a device call can carry (`megatron-sep corpus-subset`).
set -euo pipefail
sweep=$1 tokens=$2 runs=$3 out=$4 data=${5:-data/offline}
shift $(( $# < 5 ? $# : 5 ))
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out"
if [ -f "$data/train_text_document.bin.xz" ] && [ ! -f "$data/train_text_document.bin" ]; then
  xz -d -k -T0 "$data/train_text_document.bin.xz"
fi
python3 -m megatron_sep sweep configs/experiments/sepllm_paper.yaml --tokens "$tokens" --out "$sweep" \
  --only "$runs" \
  --set data.tokenizer="$data/tokenizer.model" --set "data.paths=[$data/train_text_document]" \
  --set "data.split=[0.99, 0.01, 0.0]" --set train.compile=true --set train.global_batch_size=32 \
  --set train.micro_batch_size=16 --set train.eval_interval=50 --set train.eval_iters=10 \
  --set checkpoint.save_interval=300 --set checkpoint.keep_last=1 --set logging.log_interval=10 \
  --set logging.tensorboard=false "$@" 2>&1 | grep -v "^\[.*\] step .*| loss" || true
# what the report needs, without checkpoints: metrics, cached evaluations, configs, logs, the report itself
tar czf "$out/sweep_$(echo "$runs" | tr ',' '_').tgz" -C "$(dirname "$sweep")" \
  $(cd "$(dirname "$sweep")" && ls -d "$(basename "$sweep")"/{sweep.json,report.*,*.png,configs,logs} \
    "$(basename "$sweep")"/runs/*/{metrics.jsonl,sweep_eval.json,config.yaml} 2>/dev/null)
cat "$sweep/report.md" 2>/dev/null | head -40
