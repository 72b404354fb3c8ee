#!/usr/bin/env bash
# Issue 38 on one GPU, one device call: the Trainer at 16K with fp8 linears on both sides (SepLLM fp8 against
# dense fp8, bf16 beside them) and at 128K with activation checkpointing on both sides. torchao comes as a
# wheel in .whl/ (carried).   bash benchmarks/long_context_call.sh OUT
set -x
out=$1
source "$(dirname "$0")/run_guard.sh"
fresh_out "$out"  # it writes here and removes its own trainer_run: only in a folder it made
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
pip install --no-deps --target /tmp/site .whl/torchao-*.whl -q 2>&1 | tail -1
python3 -c "import torch, triton, torchao; print(torch.__version__, triton.__version__, torchao.__version__, torch.cuda.get_device_name())"
timeout 300 python3 benchmarks/train_throughput.py --preset llama350m-16k-fp8 --modes compile --out "$out" 2>&1 | grep -v Warning | tail -6
timeout 270 python3 benchmarks/train_throughput.py --preset llama350m-128k --modes compile --steps 3 --out "$out" 2>&1 | grep -v Warning | tail -4
rm -rf "$out/trainer_run"  # the Trainer's run dir: not a result (the device returns 8 files at most)
