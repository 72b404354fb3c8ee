#!/usr/bin/env bash
# The streaming benchmark on one GPU (issue 17), in stages that fit the device's 10-minute calls:
#   bash benchmarks/streaming.sh train OUT   # train configs/llama150m_stream.yaml on data/stream
#   bash benchmarks/streaming.sh probe OUT   # 128K tokens through every cache: timing for the long runs
#   bash benchmarks/streaming.sh stream OUT  # 1M held-out tokens: SepCache (4,64,256,512) and StreamingLLM
#   bash benchmarks/streaming.sh full OUT    # the same stream with the full KV cache, until time or memory ends
# data/stream comes from benchmarks/streaming_corpus.py, `megatron-sep tokenizer train` and `preprocess`.
set -euo pipefail
stage=$1 out=$2
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
run=runs/llama150m_stream
ms() { python3 -m megatron_sep "$@"; }
stream() {  # name tokens caches [extra eval flags]
  local name=$1 tokens=$2 caches=$3; shift 3
  ms eval --load $run --out "$out/$name" --force --text data/stream/heldout.jsonl --device cuda \
    --stream-tokens "$tokens" --cache "$caches" --cache-sizes 4,64,256,512 --cache-positions cache \
    --segment 65536 --chunk 64 --no-progress "$@" 2>&1 | tee "$out/$name.log"
}
case $stage in
  train) ms train --config configs/llama150m_stream.yaml 2>&1 | tee "$out/train.log"
         cp $run/metrics.jsonl "$out/train_metrics.jsonl" ;;
  probe) stream probe 131072 sep,streaming,full --iters 2 ;;
  stream) stream "stream_${CACHES:-sep,streaming}" 1048576 "${CACHES:-sep,streaming}" ${TIME_LIMIT:+--time-limit $TIME_LIMIT} ;;
  full) stream full 1048576 full --iters 1 --time-limit "${TIME_LIMIT:-300}" ;;
  *) echo "unknown stage $stage: train, probe, stream or full" >&2; exit 2 ;;
esac
