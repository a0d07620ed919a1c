#!/usr/bin/env bash
# One 24 GB GPU (RTX 3090/4090, A10, L4): Qwen2.5-Coder-3B in 4-bit NF4 + LoRA, the paper's task mix.
# NOT RUN HERE: written for a CUDA machine; the machines this repo was built on have no GPU.
#
# Memory plan (bf16 compute): 3B base in NF4 ~2 GB; LoRA r=16 + AdamW state < 0.5 GB; generation KV cache for
# 32 sequences x ~3k tokens ~3.5 GB (36 layers, 2 KV heads x 128); the update runs 2 sequences per micro-batch
# with gradient checkpointing and keeps logits only for response tokens (~1.2 GB fp32 per 2k-token response).
# If you hit out-of-memory: lower --generation-batch-size first, then --max-new-tokens-*, then --micro-batch-size.
# First install the CUDA build of torch 2.13 (see README), then `pip install -r requirements.txt`.
#
#   bash examples/gpu_24gb.sh                    # extra flags pass through, e.g. --iterations 50 --eval-every 10
set -euo pipefail
cd "$(dirname "$0")/.."
python azr.py --preset paper \
    --model Qwen/Qwen2.5-Coder-3B --load-in-4bit --gradient-checkpointing \
    --lora-r 16 --lora-alpha 32 --learning-rate 1e-5 \
    --tasks-per-iteration 96 --learnability-samples 8 --num-references 6 --seed-buffer-size 256 \
    --max-new-tokens-propose 2048 --max-new-tokens-solve 2048 \
    --generation-batch-size 32 --micro-batch-size 2 \
    --eval-every 10 --eval-limit 200 \
    --output-dir runs/gpu_24gb "$@"
