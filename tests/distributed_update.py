"""One TRR++ update (azr.policy_update) on a fixed batch; tests/test_distributed.py runs it under torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_update.py MODEL_DIR OUT.pt

Every process checks that all processes end with identical weights; the main one saves them and the
update's statistics to OUT.pt. `update()` also runs in a single process, for the reference result.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402
import model as models  # noqa: E402
from config import Config  # noqa: E402


def fixed_batch(vocab_size: int, n: int = 5) -> list[azr.Rollout]:
    """n rollouts of different lengths and advantages over two groups (same on every process)."""
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(n):
        prompt_len = int(torch.randint(3, 9, (1,), generator=g))
        response_len = int(torch.randint(2, 7, (1,), generator=g))
        ids = torch.randint(3, vocab_size, (prompt_len + response_len,), generator=g).tolist()
        samples.append(azr.Rollout("deduction" if i % 2 else "abduction", "solve", "", ids[:prompt_len],
                                   ids[prompt_len:], "", advantage=float(torch.randn(1, generator=g))))
    return samples


def lora_policy(model_dir: str):
    """The same fresh LoRA policy every time (seeded; B made non-zero so every LoRA weight gets a gradient)."""
    torch.manual_seed(0)
    policy, tokenizer = models.load_policy(model_dir, lora_r=4, lora_alpha=8, lora_dropout=0.0, load_in_4bit=False,
                                           device="cpu", dtype="fp32")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return policy, tokenizer


def update(model_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One policy_update of lora_policy on fixed_batch; returns the trained LoRA weights and the update's stats."""
    policy, tokenizer = lora_policy(model_dir)
    # plain SGD: the step is the summed gradient itself (Adam would blow float rounding in a near-zero gradient
    # element up to a whole lr-sized step, and would hide a gradient scaled by a wrong token count)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.1)
    cfg = Config(micro_batch_size=2, ppo_epochs=2, entropy_coef=0.01, kl_coef=0.1)
    stats = azr.policy_update(policy, optimizer, fixed_batch(len(tokenizer)), cfg, azr.Timer(),
                              random.Random(0))
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}, stats


if __name__ == "__main__":
    model_dir, out = sys.argv[1], sys.argv[2]
    state = azr.processes()
    weights, stats = update(model_dir)
    everyone = gather_object([torch.cat([w.flatten() for w in weights.values()])])
    assert len(everyone) == state.num_processes and all(torch.equal(everyone[0], w) for w in everyone), \
        "processes ended with different weights"
    if state.is_main_process:
        torch.save({"weights": weights, "stats": stats, "world": state.num_processes}, out)
    state.wait_for_everyone()   # leave together: a rank tearing gloo down while its peer still works can abort
    state.destroy_process_group()
