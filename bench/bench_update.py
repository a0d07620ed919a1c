"""bench/bench_update.py — seconds of one policy update: LoRA in float32 (PEFT's input casts) vs bf16 autocast.

A cpu-demo iteration trains on 12 samples (6 proposals, 6 solver answers) in 2 mini-batches, micro-batches of 2.
This builds 12 such samples (prompt and response lengths like a cpu-demo iteration's, random tokens) and runs
`azr.policy_update` on them in alternating rounds, on the same policy:

- float32: PEFT casts every adapted layer's input to the float32 LoRA weights and the sum back (the update before);
- autocast: the adapter's matmuls run in bf16 under `model.lora_autocast`, inputs uncast (the update now).

It prints the update's seconds per round, their ratio, and how far apart the two paths' first-step log-probs and
gradients are.

    python bench/bench_update.py                 # default model, 2 rounds per path (about 5 minutes on 2 cores)
    python bench/bench_update.py --model PATH --rounds 1     # any model path or hub id
"""
from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules
import azr  # noqa: E402
import model as models  # noqa: E402
from config import PRESETS, Config  # noqa: E402


def samples(vocab: int, rng: random.Random) -> list[azr.Rollout]:
    """12 rollouts shaped like a cpu-demo iteration's: proposals (~300-token prompts, up to 384 new tokens) and
    solver answers (~250-token prompts, up to 256 new tokens), advantages of both signs."""
    rows = []
    for role, prompt, cap in (("propose", 300, 384), ("solve", 250, 256)):
        for k in range(6):
            rows.append(azr.Rollout(
                task_type=("deduction", "abduction", "induction")[k % 3], role=role, prompt="", response="",
                prompt_ids=[rng.randrange(vocab) for _ in range(prompt + rng.randrange(-40, 40))],
                response_ids=[rng.randrange(vocab) for _ in range(rng.randrange(cap // 3, cap))],
                advantage=rng.choice((-1.0, 1.0)) * rng.uniform(0.3, 1.5)))
    return rows


def float32_adapter():
    """The update as it was: no autocast, PEFT's input casts on."""
    return mock.patch.multiple(models, lora_autocast=lambda policy: contextlib.nullcontext(),
                               adapter_inputs_uncast=lambda policy: contextlib.nullcontext())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="hub id or local path (default: the default model)")
    ap.add_argument("--dtype", default="bf16", help="base weights dtype (the CPU default is bf16)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per path")
    args = ap.parse_args()
    models.set_torch_threads()
    cfg = Config(**{**PRESETS["cpu-demo"], "model": args.model})
    policy, tokenizer = models.load_policy(args.model, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                           load_in_4bit=False, gradient_checkpointing=True, device="cpu",
                                           dtype=args.dtype)
    with torch.no_grad():                       # as after a few steps: B nonzero, so both LoRA matrices get gradients
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    batch = samples(len(tokenizer), random.Random(0))
    state = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k}
    trainable = [p for p in policy.parameters() if p.requires_grad]
    if not models.lora_below_base_precision(policy):
        sys.exit(f"error: the base is {args.dtype}, not bf16, so both paths are the same")
    totals = {"float32": 0.0, "autocast": 0.0}
    for rnd in range(1, args.rounds + 1):
        for path in totals:
            policy.load_state_dict(state, strict=False)             # same weights for every round
            optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
            timer = azr.Timer()
            with float32_adapter() if path == "float32" else contextlib.nullcontext():
                start = time.perf_counter()
                stats = azr.policy_update(policy, optimizer, batch, cfg, tokenizer.pad_token_id, timer,
                                          random.Random(0))
                seconds = time.perf_counter() - start
            totals[path] += seconds
            print(f"round {rnd} {path:8s} update {seconds:6.1f} s ({stats['steps']} optimizer steps, "
                  f"loss {stats['loss']:+.4f}, grad norm {stats['grad_norm']:.4f})", flush=True)
    print(f"update seconds: float32 {totals['float32']:.1f}, autocast {totals['autocast']:.1f}: "
          f"{totals['float32'] / totals['autocast']:.2f}x")
    probe = batch[:2]
    grads, logps = {}, {}
    for path in totals:
        policy.load_state_dict(state, strict=False)
        policy.zero_grad(set_to_none=True)
        with float32_adapter() if path == "float32" else contextlib.nullcontext(), models.adapter_inputs_uncast(policy):
            logp, _, mask = azr.response_logps(policy, probe, tokenizer.pad_token_id, cfg.temperature)
            (-(logp * mask).sum() / mask.sum()).backward()
        logps[path], grads[path] = logp.detach() * mask, torch.cat([p.grad.flatten() for p in trainable])
    cos = float(torch.nn.functional.cosine_similarity(grads["float32"].double(), grads["autocast"].double(), dim=0))
    print(f"2 samples: max |log-prob difference| {float((logps['float32'] - logps['autocast']).abs().max()):.4f}, "
          f"gradient cosine {cos:.5f}, norm ratio {float(grads['autocast'].norm() / grads['float32'].norm()):.4f}")


if __name__ == "__main__":
    main()
