"""bench/bench_update_memory.py — peak memory of the update on long rollouts, with and without checkpointing the
micro-batches over --checkpoint-above-positions.

Each setting runs in a fresh process (so its peak RSS is its own): the default model as cpu-demo loads it,
then one azr.policy_update over --rollouts synthetic rollouts of --prompt + --response tokens (distinct random
prompts: no shared prefix), in the preset's micro-batches of 1. It prints each setting's peak RSS and update seconds
side by side; the LoRA gradients of the two are the same (tests/test_update.py).

    python bench/bench_update_memory.py                          # 2 rollouts of 1,300 + 300 tokens, 0 vs 768
    python bench/bench_update_memory.py --prompt 2000 --response 384 --model PATH
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules

from bench_model import peak_rss_gb  # noqa: E402  (this process's peak RSS, GiB)


def one_update(args: argparse.Namespace, checkpoint_above: int) -> dict:
    """Load the policy as cpu-demo does, update it once on synthetic rollouts; seconds and peak RSS."""
    import torch

    import azr
    import model as models
    from config import PRESETS, Config

    models.set_torch_threads()
    cfg = Config(**{**PRESETS["cpu-demo"], "checkpoint_above_positions": checkpoint_above, "mini_batches": 1})
    policy, tokenizer = models.load_policy(args.model, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                           gradient_checkpointing=cfg.gradient_checkpointing, dtype=cfg.dtype)
    loaded = peak_rss_gb()
    rng = random.Random(0)
    tokens = lambda n: [rng.randrange(len(tokenizer)) for _ in range(n)]             # noqa: E731
    samples = [azr.Rollout("induction", "propose", "", tokens(args.prompt), tokens(args.response), "",
                           advantage=rng.uniform(-1, 1)) for _ in range(args.rollouts)]
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    t0 = time.perf_counter()
    azr.policy_update(policy, optimizer, samples, cfg, azr.Timer(), random.Random(0))
    return {"checkpoint_above": checkpoint_above, "seconds": time.perf_counter() - t0, "loaded_gib": loaded,
            "peak_gib": peak_rss_gb()}


def main() -> None:
    import model as models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="hub id or local path (default: the default model)")
    ap.add_argument("--rollouts", type=int, default=2, help="rollouts in the update")
    ap.add_argument("--prompt", type=int, default=1300, help="prompt tokens per rollout")
    ap.add_argument("--response", type=int, default=300, help="response tokens per rollout")
    ap.add_argument("--settings", type=int, nargs="+", default=[0, 768], metavar="N",
                    help="--checkpoint-above-positions values to compare (0: no checkpointing)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(one_update(args, args.child)))
        return
    print(f"{args.rollouts} rollouts of {args.prompt} + {args.response} tokens, micro-batches of 1", flush=True)
    rows = []
    for setting in args.settings:
        out = subprocess.run([sys.executable, __file__, "--child", str(setting), "--model", args.model,
                              "--rollouts", str(args.rollouts), "--prompt", str(args.prompt),
                              "--response", str(args.response)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"bench_update_memory: the run with {setting} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"checkpoint above {setting or 'never':>5}: update {r['seconds']:6.1f} s, "
              f"peak RSS {r['peak_gib']:.2f} GiB (after loading {r['loaded_gib']:.2f})", flush=True)
    if len(rows) == 2:
        a, b = rows
        print(f"ratio: time {b['seconds'] / a['seconds']:.2f}x, peak {b['peak_gib'] - a['peak_gib']:+.2f} GiB")


if __name__ == "__main__":
    main()
