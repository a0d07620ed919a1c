"""bench/bench_int8.py — int8 sampling weights against the policy's own, side by side in one process.

What --sampling-weights int8 (generation.int8_linears) costs and buys, on the default model in float32:

1. drift: the next-token distributions of the int8 copy against the float32 model's, teacher-forced over the first
   --drift-items CRUXEval programs with their asserts (mean and 95th-percentile KL(float32 || int8) per token, and
   how often the two agree on the most likely token); a bfloat16 copy beside it for scale;
2. speed: one cpu-demo iteration's generation (bench_generation.prompt_mix: proposals, learnability samples and a
   solver batch, the preset's caps and sampling), through generation.generate with the policy's weights and with
   int8 ones, in alternating rounds: useful tokens/s of each and their ratio;
3. greedy agreement: the solver prompts decoded greedily both ways, identical responses counted.

    python bench/bench_int8.py                     # default model, float32, 1 round each (about 10 min on 2 cores)
    python bench/bench_int8.py --rounds 2 --model PATH
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules
sys.path.insert(0, str(REPO / "bench"))
import model as models  # noqa: E402
from bench_generation import prompt_mix  # noqa: E402
from config import PRESETS, Config  # noqa: E402
from generation import GenerationStats, adapters_merged, generate, int8_linears  # noqa: E402

CRUXEVAL = REPO / "data" / "cruxeval" / "cruxeval.jsonl"


@torch.no_grad()
def drift(policy, tokenizer, items: int) -> None:
    """KL(float32 || other) per token and top-1 agreement, teacher-forced on CRUXEval programs."""
    rows = [json.loads(line) for line in CRUXEVAL.read_text().splitlines()[:items]]
    text = "\n\n".join(f"{r['code']}\nassert f({r['input']}) == {r['output']}" for r in rows)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    policy.eval()
    with adapters_merged(policy):
        exact = torch.log_softmax(policy(input_ids=ids).logits.float(), -1)
        with int8_linears(policy):
            int8 = torch.log_softmax(policy(input_ids=ids).logits.float(), -1)
    policy.to(torch.bfloat16)
    try:
        bf16 = torch.log_softmax(policy(input_ids=ids).logits.float(), -1)
    finally:
        policy.to(torch.float32)
    print(f"drift over {ids.shape[1]} positions of {items} CRUXEval programs, against float32:")
    for name, other in (("int8", int8), ("bf16", bf16)):
        kl = (exact.exp() * (exact - other)).sum(-1)[0]
        top1 = (exact.argmax(-1) == other.argmax(-1)).float().mean()
        print(f"  {name}: KL per token mean {kl.mean():.4f}, p95 {kl.quantile(0.95):.4f}; top-1 agreement {top1:.3f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=1, help="rounds per weights, alternating policy / int8")
    parser.add_argument("--drift-items", type=int, default=10, help="CRUXEval programs of the drift check")
    parser.add_argument("--greedy-tokens", type=int, default=128, help="token cap of the greedy agreement check")
    parser.add_argument("--max-new-tokens", type=int, help="response cap of the speed rounds (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    models.set_torch_threads()
    cfg = Config(**PRESETS["cpu-demo"])
    policy, tokenizer = models.load_policy(args.model, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, dtype="fp32")
    drift(policy, tokenizer, args.drift_items)
    propose, estimate, solve = prompt_mix(tokenizer, cfg, args.seed)
    print(f"mix: {len(propose)} proposals, {len(estimate)} learnability samples, {len(solve)} solver answers",
          flush=True)
    useful = {"policy": 0, "int8": 0}    # useful tokens and wall seconds (quantizing included) per weights
    wall = {"policy": 0.0, "int8": 0.0}
    for r in range(args.rounds):
        for name in useful:
            torch.manual_seed(args.seed + r)
            kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.generation_batch_size,
                      int8=name == "int8")
            one, t0 = GenerationStats(), time.perf_counter()
            generate(policy, tokenizer, propose, args.max_new_tokens or cfg.max_new_tokens_propose, stats=one, **kw)
            generate(policy, tokenizer, estimate + solve, args.max_new_tokens or cfg.max_new_tokens_solve, stats=one,
                     **kw)
            seconds = time.perf_counter() - t0            # with int8: quantizing the layers, twice
            useful[name] += one.useful_tokens
            wall[name] += seconds
            print(f"round {r + 1} {name:6s} {one.useful_tokens:5d} useful tokens in {seconds:6.1f} s "
                  f"= {one.useful_tokens / seconds:5.1f} tok/s (prefill {one.prefill_seconds:5.1f} s, decode "
                  f"{one.decode_seconds:6.1f} s, the rest quantizing and bookkeeping)", flush=True)
    rate = {name: useful[name] / wall[name] for name in useful}
    print(f"useful tok/s: policy {rate['policy']:.1f}, int8 {rate['int8']:.1f}; ratio int8 / policy "
          f"{rate['int8'] / rate['policy']:.2f}x")
    greedy = {name: [g.response_ids for g in generate(policy, tokenizer, solve, args.greedy_tokens, temperature=0.0,
                                                      batch_size=cfg.generation_batch_size, int8=name == "int8")]
              for name in useful}
    same = sum(a == b for a, b in zip(greedy["policy"], greedy["int8"]))
    print(f"greedy check ({args.greedy_tokens} tokens, {len(solve)} solver prompts): identical responses "
          f"{same}/{len(solve)}")


if __name__ == "__main__":
    main()
