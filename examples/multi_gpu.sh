#!/usr/bin/env bash
# Several GPUs on one machine with `accelerate launch` (DDP): each GPU a full copy of the 4-bit model + LoRA.
# NOT RUN HERE (no GPU). STATUS: azr.py does not yet split work across processes: launched like this, every
# process runs its own independent copy of the loop into the same run directory (checked on CPU with
# `torchrun --nproc_per_node 2`, which is what `accelerate launch --multi_gpu` uses; `accelerate launch --cpu
# --num_processes 2` starts only ONE process in accelerate 1.15, multi-CPU there needs mpirun). The README lists
# the changes DDP needs (rank-sharded rollouts, gathered tasks and rewards, DDP-wrapped update, rank-0 I/O).
#
#   NUM_GPUS=4 bash examples/multi_gpu.sh        # extra flags pass through to azr.py
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
accelerate launch --multi_gpu --num_processes "$NUM_GPUS" --num_machines 1 --mixed_precision bf16 \
    azr.py --preset paper --model Qwen/Qwen2.5-Coder-3B --load-in-4bit \
    --tasks-per-iteration 192 --generation-batch-size 32 --micro-batch-size 2 \
    --output-dir runs/multi_gpu "$@"
