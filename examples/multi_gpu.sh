#!/usr/bin/env bash
# Several GPUs on one machine with `accelerate launch` (data parallel): each GPU a full copy of the 4-bit model + LoRA.
# Each process generates and scores its share of the rollouts, the tasks and rewards are gathered so every
# process keeps the same buffers, and the gradients are all-reduced before each optimizer step; only the main
# process writes logs, plots and checkpoints. Tasks per iteration are the global count (split across processes).
# The preset is named (every process must build the same config; PRESET=gpu-48gb for 48 GB cards), and only
# options that something reads are passed: azr.py sets its own dtype (--dtype), so accelerate's mixed-precision
# setting is left at its default.
# NOT RUN HERE ON GPUs (none on this machine). The same code path is tested on CPU (gloo) by
# tests/test_distributed.py with `accelerate launch --multi_gpu --num_processes 2 --num_machines 1
# --mixed_precision no --dynamo_backend no` on a tiny model (`accelerate launch --cpu --num_processes 2` starts
# only ONE process in accelerate 1.15; multi-CPU there needs mpirun).
#
#   NUM_GPUS=4 bash examples/multi_gpu.sh        # extra flags pass through to azr.py
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
accelerate launch --multi_gpu --num_processes "$NUM_GPUS" --num_machines 1 \
    azr.py --preset "${PRESET:-gpu-24gb}" --output-dir runs/multi_gpu "$@"
