#!/usr/bin/env bash
# Issue 38: SepCache streaming at GPU speed, in one device call. Trains the 152M streaming model
# (configs/llama150m_stream.yaml) on the carried 96M-token offline subset, documents of data.split's first
# 90% only; then streams tokens it never saw (.carry/stream: the documents right after that range) through
# SepCache (built here when missing): the three decode paths side by side over the first 64K tokens (benchmarks/stream_speed.py),
# then `megatron-sep eval --stream-tokens 4M` under CUDA graphs with the no-cache reference per segment.
#   bash benchmarks/stream_4m.sh OUT [STEPS] [TOKENS]
set -euo pipefail
out=$1 steps=${2:-600} tokens=${3:-4194304}
source "$(dirname "$0")/run_guard.sh"
fresh_out "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
data=.carry/offline stream=.carry/stream/stream_text_document run=runs/stream4m
[ -f $data/train_text_document.bin ] || xz -d -k -T0 $data/train_text_document.bin.xz
fresh_runs "this script trains it from scratch" $run
ms() { python3 -m megatron_sep "$@"; }
# the stream: whole documents right after data.split's training range, never trained on (made once, carried)
[ -f $stream.bin ] || python3 - "$data/train_text_document" "$stream" "$tokens" <<'PY'
import json, sys
import numpy as np
from megatron_sep.data.dataset import split_ranges
from megatron_sep.data.indexed import IndexedDataset, IndexedDatasetWriter
ix = IndexedDataset(sys.argv[1])
lo = d = split_ranges(ix.num_docs, [0.9, 0.1, 0.0])[1][0]
have, need = 0, int(sys.argv[3]) + 1
with IndexedDatasetWriter(sys.argv[2], np.uint16) as w:
    while have < need:
        w.add_document(np.asarray(ix.get_doc(d)))
        have, d = have + int(ix.doc_sizes[d]), d + 1
json.dump({"source": sys.argv[1], "documents": [lo, d], "tokens": have}, open(sys.argv[2] + ".json", "w"))
PY
ms train --config configs/llama150m_stream.yaml --set data.tokenizer=$data/tokenizer.model \
  --set "data.paths=[$data/train_text_document]" --set "data.split=[0.9, 0.1, 0.0]" \
  --set train.steps="$steps" --set train.run_dir=$run --set train.compile=true \
  --set checkpoint.save_interval="$steps" --set logging.tensorboard=false 2>&1 | tee "$out/train.log" | grep -E "step +($steps|100|300)/|val|error" || true
python3 benchmarks/stream_speed.py --load $run --data $stream --out "$out" --force --tokens 65536 2>&1 | tail -3
ms eval --load $run --data $stream --out "$out/eval" --device cuda --iters 4 --stream-tokens "$tokens" \
  --segment 262144 --chunk 64 --cache sep --cache-sizes 4,64,256,512 --cache-positions cache \
  --time-limit "${TIME_LIMIT:-330}" --no-progress 2>&1 | tail -4
rm -f "$out/eval/loss_by_position.png"  # the device returns 8 files at most
