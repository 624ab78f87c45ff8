#!/usr/bin/env bash
# Two GPUs of one host: one process with both (mesh data=2, fsdp=2), two processes with one GPU each
# over NCCL (as `fastblt launch slurm` starts them), a 2-process checkpoint restored on one GPU; the
# losses of every layout next to one GPU's. Usage (from the repository root, on a 2-GPU machine):
#   bash experiments/benchmarks/multi_gpu.sh OUT_DIR [extra multi_gpu.py options]
set -euo pipefail
out=${1:?usage: multi_gpu.sh OUT_DIR [options]}
shift
. experiments/benchmarks/gpu_env.sh
# NVLink multicast (NVLS) stays off on the lent machines: leave NCCL_NVLS_ENABLE as the machine sets it.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
n=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
if [ "$n" -lt 2 ]; then
  echo "multi_gpu.sh: needs 2 GPUs, this machine shows $n" >&2
  exit 2
fi
python3 experiments/benchmarks/multi_gpu.py --shape mid --steps 20 --out "$out" "$@"
