"""bench_generation.py — useful tokens per second of the loop's generation, old way against new, in one run.

The prompt mix is one cpu-demo iteration's: proposals for the three task types, N learnability samples of
each of a few tasks, and one solver answer per task (tasks from the shipped official seed file). Both paths get
the same prompts, sampling settings and token caps, with rounds alternating:

- padded: plain batched `model.generate` (left padding, batches sorted by length; finished rows keep computing);
- ours:   generation.generate (shared prefixes computed once, finished rows leave the batch).

It prints useful tokens/s of each and their ratio, and the share of computed positions that were useful response
tokens (of decode positions, and of prefill + decode positions). Then a greedy check: the same prompts decoded
greedily by both paths, against the unpadded one-prompt-at-a-time `model.generate` as the reference.

    python bench_generation.py                       # default model, one round each
    python bench_generation.py --rounds 2 --greedy-prompts 12
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

import model as models
from buffers import TASK_TYPES, Buffers, read_seed_file
from generation import GenerationStats, generate, generate_padded
from prompts import propose_prompt, render, solve_prompt

SEED_FILES = ["data/azr-seeds/3b_coder_seed_io.jsonl", "data/azr-seeds/3b_coder_code_f_seed_io.jsonl"]


def prompt_mix(tokenizer, proposals: int, learnability_tasks: int, samples: int, solves: int, k: int,
               seed: int) -> tuple[list[str], list[str]]:
    """(proposer prompts, solver prompts) of one iteration: `proposals` over the three types, `samples` copies of
    `learnability_tasks` solver prompts, and `solves` solver prompts. Outputs are not needed to render them."""
    rng = random.Random(seed)
    tasks = [t for path in SEED_FILES for t in read_seed_file(Path(__file__).parent / path)]
    buffers = Buffers(TASK_TYPES)
    programs = [t for t in tasks if t.task_type != "induction"]
    propose = [render(tokenizer, propose_prompt(TASK_TYPES[i % 3], buffers[TASK_TYPES[i % 3]].sample_references(k, rng),
                                                program=rng.choice(programs)))
               for i in range(proposals)]
    for t in tasks:                # an output of some kind for the abduction/induction solver prompts to show
        t.output, t.outputs = t.output or "None", t.outputs or ["None"] * len(t.inputs)
    chosen = rng.sample(tasks, learnability_tasks + solves)
    solve = [render(tokenizer, solve_prompt(t)) for t in chosen[:learnability_tasks] for _ in range(samples)]
    solve += [render(tokenizer, solve_prompt(t)) for t in chosen[learnability_tasks:]]
    return propose, solve


def run(path: str, policy, tokenizer, propose: list[str], solve: list[str], args) -> tuple[float, GenerationStats]:
    fn = generate if path == "ours" else generate_padded
    stats = GenerationStats()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    fn(policy, tokenizer, propose, args.max_new_tokens_propose, temperature=args.temperature,
       batch_size=args.batch_size, stats=stats)
    fn(policy, tokenizer, solve, args.max_new_tokens_solve, temperature=args.temperature,
       batch_size=args.batch_size, stats=stats)
    return time.perf_counter() - t0, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--proposals", type=int, default=12, help="cpu-demo: 12 per iteration")
    parser.add_argument("--learnability-tasks", type=int, default=4, help="valid proposals to estimate")
    parser.add_argument("--samples", type=int, default=4, help="N learnability samples (cpu-demo: 4)")
    parser.add_argument("--solves", type=int, default=12, help="solver answers (cpu-demo: 12)")
    parser.add_argument("--references", type=int, default=2)
    parser.add_argument("--max-new-tokens-propose", type=int, default=384)
    parser.add_argument("--max-new-tokens-solve", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--greedy-prompts", type=int, default=8)
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    models.set_torch_threads()
    policy, tokenizer = models.load_policy(args.model)
    propose, solve = prompt_mix(tokenizer, args.proposals, args.learnability_tasks, args.samples, args.solves,
                                args.references, args.seed)
    print(f"prompt mix: {len(propose)} proposals, {len(solve)} solver prompts "
          f"({args.learnability_tasks} tasks x {args.samples} learnability samples + {args.solves}); "
          f"caps {args.max_new_tokens_propose}/{args.max_new_tokens_solve}, T={args.temperature}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads", flush=True)
    totals = {"padded": [0.0, GenerationStats()], "ours": [0.0, GenerationStats()]}
    for r in range(args.rounds):
        for path in (("padded", "ours") if r % 2 == 0 else ("ours", "padded")):
            seconds, stats = run(path, policy, tokenizer, propose, solve, args)
            totals[path][0] += seconds
            totals[path][1].add(stats)
            print(f"round {r + 1} {path:6s} {seconds:7.1f}s  useful {stats.useful_tokens:6d} tokens  "
                  f"{stats.useful_tokens / seconds:6.1f} useful tok/s  prefill {stats.prefill_tokens} "
                  f"decode {stats.decode_tokens} positions", flush=True)
    rate = {}
    for path, (seconds, stats) in totals.items():
        rate[path] = stats.useful_tokens / seconds
        print(f"{path:6s} useful tok/s {rate[path]:6.1f}  useful/computed decode "
              f"{stats.useful_tokens / stats.decode_tokens:.2f}  useful/computed all "
              f"{stats.useful_tokens / (stats.decode_tokens + stats.prefill_tokens):.3f}  "
              f"prefill positions {stats.prefill_tokens}"
              + (f"  prefill {stats.prefill_seconds:.0f}s decode {stats.decode_seconds:.0f}s" if path == "ours" else ""))
    print(f"speed-up (useful tok/s, ours / padded): {rate['ours'] / rate['padded']:.2f}x", flush=True)

    prompts = (propose[:args.greedy_prompts // 2] + solve[:args.greedy_prompts - args.greedy_prompts // 2])
    reference = generate_padded(policy, tokenizer, prompts, args.greedy_tokens, temperature=0.0, batch_size=1)
    padded = generate_padded(policy, tokenizer, prompts, args.greedy_tokens, temperature=0.0,
                             batch_size=args.batch_size)
    ours = generate(policy, tokenizer, prompts, args.greedy_tokens, temperature=0.0, batch_size=args.batch_size)
    same = lambda a: sum(x.text == y.text for x, y in zip(a, reference))   # noqa: E731
    print(f"greedy, {len(prompts)} prompts x {args.greedy_tokens} tokens, same text as one-at-a-time "
          f"model.generate: ours {same(ours)}/{len(prompts)}, padded batch {same(padded)}/{len(prompts)}")


if __name__ == "__main__":
    main()
