#!/usr/bin/env bash
# One node, all its GPUs (or NPROC processes): launch/torchrun.sh -c configs/X.yaml [--set k=v ...]
# The layout comes from the config (parallel.tp / pp / cp / dp); dp defaults to world / (tp * pp * cp).
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l)
  [ "$NPROC" -gt 0 ] || NPROC=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node="$NPROC" -m megatron_sep train "$@"
