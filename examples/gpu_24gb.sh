#!/usr/bin/env bash
# One 24 GB GPU (RTX 3090/4090, A10, L4): the gpu-24gb preset, Qwen2.5-Coder-3B in 4-bit NF4 + LoRA with bf16
# compute, starting from the official seed files in data/azr-seeds/, with a CRUXEval-O check every 10 iterations.
# NOT RUN HERE: written for a CUDA machine; the machines this repo was built on have no GPU.
#
# Memory plan (python azr.py --plan --gpu-memory-gib 24, from the model's config alone; not yet measured on a GPU):
# weights 1.9 GiB, LoRA + AdamW 0.45 GiB, KV cache of 64 rows x (2,312 + 2,048 tokens) 9.9 GiB, one update
# micro-batch 5.3 GiB; peak 14.3 GiB with fragmentation and the CUDA context: 40% of the card free.
# To check on your card first: python bench/gpu_check.py (a few minutes, no download).
# If you hit out-of-memory: lower --generation-batch-size first, then --max-new-tokens-*, then --micro-batch-size.
# First install the CUDA build of torch 2.13 (see README), then `pip install -r requirements.txt`.
#
#   bash examples/gpu_24gb.sh                    # extra flags pass through, e.g. --iterations 50 --eval-every 20
set -euo pipefail
cd "$(dirname "$0")/.."
python azr.py --preset gpu-24gb \
    --eval-every 10 --eval-limit 200 \
    --output-dir runs/gpu_24gb "$@"
