#!/usr/bin/env bash
# Issue 39 on one GPU, one device call: FSDP2 vs native at the 1.3B shape (bf16, fp8), prefetch on/off at
# Pythia-160M 2K, and the SepAttention kernels' registers. torchao comes as a wheel in .whl/ (carried).
#   bash benchmarks/engines_call.sh OUT
set -x
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
pip install --no-deps --target /tmp/site .whl/torchao-*.whl -q 2>&1 | tail -1
python3 -c "import torch, triton, torchao; print(torch.__version__, triton.__version__, torchao.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total --format=csv
out=${1:-$OUT/a}
source "$(dirname "$0")/run_guard.sh"
fresh_out "$out"  # it writes here and removes its own trainer_run: only in a folder it made
timeout 60 python3 benchmarks/kernel_registers.py --out $out 2>&1 | tail -8
timeout 420 python3 benchmarks/train_throughput.py --preset llama1.3b-engines --modes compile --out $out 2>&1 | grep -v Warning | tail -12
timeout 100 python3 benchmarks/train_throughput.py --preset pythia160m-2k --modes compile --only "trainer/sepllm-n128:compile,trainer/sepllm-n128^p0:compile" --out $out 2>&1 | tail -4
rm -rf "$out/trainer_run"  # the Trainer's run dir: not a result (the device returns 8 files at most)
