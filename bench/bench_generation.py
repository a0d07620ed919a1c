"""bench/bench_generation.py — useful tokens/s of one self-play iteration's prompt mix: before and after, side by side.

The mix is what a cpu-demo iteration of 6 proposals generates (the preset's size when this was measured; it now
proposes 12): proposals (2 per task type), N learnability samples for 3 valid proposals (one per type) and a solver
batch (2 per type), with the preset's token caps and sampling. Prompts are built by the loop's own code from the
shipped official seed tasks. Two paths run in alternating rounds in one process:

- padded: the loop as it was: three generation phases (propose, learnability, solve) through `padded_generate`
  below (plain batched `model.generate`: every prompt prefilled, LoRA in float32, transformers' `stop_strings`),
  batches of --padded-batch-size;
- shared: the loop now: two phases (propose; learnability and solve together) through `generation.generate`
  (a prompt repeated within a batch prefilled once, LoRA in the base dtype while sampling, a last-token stop
  check, finished rows dropped every DECODE_CHUNK steps), batches of the preset's --generation-batch-size.

It prints useful tokens/s of each path and their ratio, the share of computed decode positions that were useful,
and the prefill/decode split. Then a reproducibility check: greedy decoding of the solver prompts through both
paths, the same text expected. With --evaluate N it instead compares the two paths on evaluate.py's greedy
CRUXEval-O generation.

    python bench/bench_generation.py                 # default model, 2 rounds per path (about 15 minutes on 2 cores)
    python bench/bench_generation.py --rounds 1 --model PATH       # any model path or hub id
    python bench/bench_generation.py --evaluate 200   # evaluate.py's generation on 200 CRUXEval-O items, both paths
    python bench/bench_generation.py --evaluate 200 --evaluate-tokens 128 --dtype float32   # same text in float32?
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules
import azr  # noqa: E402
import model as models  # noqa: E402
from buffers import Buffers  # noqa: E402
from config import PRESETS, Config  # noqa: E402
from generation import STOP_STRINGS, GenerationStats, _stop_check, generate, left_pad, stop_token_ids  # noqa: E402,E501
from prompts import RESPONSE_PREFIX, render  # noqa: E402
from rewards import BUILTIN_TASK_TYPES, propose_prompt, seed_task, solve_prompt  # noqa: E402
from sandbox import Sandbox  # noqa: E402

SEED_FILES = ["data/azr-seeds/3b_coder_seed_io.jsonl", "data/azr-seeds/3b_coder_code_f_seed_io.jsonl"]


def prompt_mix(tokenizer, cfg: Config, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(proposer prompts, learnability prompts with their N repeats, solver prompts), rendered as the loop does."""
    rng = random.Random(seed)
    buffers = Buffers(BUILTIN_TASK_TYPES, seed=seed_task)
    with Sandbox() as sb:
        azr.load_seed_files(sb, buffers, Config(seed_file=[str(REPO / p) for p in SEED_FILES]))
    pool = [t for tt in ("deduction", "abduction") for t in buffers[tt].tasks]
    shown = cfg.induction_inputs // 2
    propose = [propose_prompt(t, buffers[t].sample_references(cfg.num_references, rng), program=rng.choice(pool),
                              num_inputs=cfg.induction_inputs, style=cfg.proposer_prompt)
               for t in BUILTIN_TASK_TYPES for _ in range(2)]
    estimate = [solve_prompt(rng.choice(buffers[t].tasks), num_shown=shown) for t in BUILTIN_TASK_TYPES]
    estimate = [p for p in estimate for _ in range(cfg.learnability_samples)]
    solve = [solve_prompt(task, num_shown=shown)
             for t in BUILTIN_TASK_TYPES for task in rng.sample(buffers[t].tasks, 2)]
    return tuple([render(tokenizer, p, cfg.template) for p in ps] for ps in (propose, estimate, solve))


@torch.no_grad()
def padded_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, *, temperature: float,
                    top_p: float, batch_size: int, stats: GenerationStats) -> list[str]:
    """The baseline: the project's generation before the changes measured here."""
    model.eval()
    stops = stop_token_ids(model, tokenizer)
    finished = _stop_check(tokenizer, set(stops))
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else
                dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id, "cpu")
        t0 = time.perf_counter()
        sequences = model.generate(**batch, **sampling, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                   pad_token_id=tokenizer.pad_token_id, stop_strings=list(STOP_STRINGS),
                                   tokenizer=tokenizer)
        width = batch["input_ids"].shape[1]
        for row, i in enumerate(idx):
            response = sequences[row, width:].tolist()
            cut = next((j + 1 for j in range(len(response)) if finished(response[:j + 1])), len(response))
            texts[i] = tokenizer.decode(response[:cut], skip_special_tokens=True)
            stats.useful_tokens += cut
        stats.prefill_tokens += batch["input_ids"].numel()
        stats.decode_tokens += len(idx) * (sequences.shape[1] - width)
        stats.decode_seconds += time.perf_counter() - t0      # prefill inside generate: not split out
    return texts


def run_path(policy, tokenizer, mix, cfg: Config, shared: bool, batch_size: int, temperature: float,
             top_p: float, cap_solve: int | None = None) -> tuple[GenerationStats, list[str]]:
    """One iteration's generation through one path; returns its costs and the solver-phase texts."""
    propose, estimate, solve = mix
    stats = GenerationStats()
    kw = dict(temperature=temperature, top_p=top_p, batch_size=batch_size, stats=stats)
    solve_cap = cap_solve or cfg.max_new_tokens_solve
    if shared:
        if cap_solve is None:
            generate(policy, tokenizer, propose, cfg.max_new_tokens_propose, **kw)
        return stats, [g.text for g in generate(policy, tokenizer, estimate + solve, solve_cap, **kw)]
    if cap_solve is None:
        padded_generate(policy, tokenizer, propose, cfg.max_new_tokens_propose, **kw)
    return stats, [t for phase in (estimate, solve) for t in padded_generate(policy, tokenizer, phase, solve_cap, **kw)]


def evaluation(args) -> None:
    """evaluate.py's generation, greedy, on the last --evaluate CRUXEval-O items: the padded path in batches of
    --padded-batch-size against generation.generate in evaluate.py's default batch; time, same text, accuracy."""
    import evaluate

    net, tokenizer = models.load_for_eval(args.model, dtype=args.dtype)
    items = evaluate.load_items("cruxeval-o", None, args.evaluate, from_end=True)
    prompts = [render(tokenizer, evaluate.build_prompt("cruxeval-o", item), evaluate.DEFAULT_TEMPLATE)
               for item in items]
    greedy = dict(temperature=0.0, top_p=1.0)
    batch = evaluate.parse_args([]).batch_size
    print(f"evaluate: {len(items)} CRUXEval-O items, greedy, {args.evaluate_tokens} new tokens; padded batch "
          f"{args.padded_batch_size}, shared batch {batch}", flush=True)
    texts, seconds = {}, {}
    for name in ("padded", "shared"):
        stats, t0 = GenerationStats(), time.perf_counter()
        if name == "padded":
            texts[name] = padded_generate(net, tokenizer, prompts, args.evaluate_tokens,
                                          batch_size=args.padded_batch_size,
                                          stats=stats, **greedy)
        else:
            texts[name] = [g.text for g in generate(net, tokenizer, prompts, args.evaluate_tokens, batch_size=batch,
                                                    stats=stats, **greedy)]
        seconds[name] = time.perf_counter() - t0
        with Sandbox() as sb:
            rows = evaluate.score("cruxeval-o", items, [RESPONSE_PREFIX + t for t in texts[name]], sb)
        print(f"evaluate {name:6s} {seconds[name]:7.1f} s, {stats.useful_tokens} tokens, useful/decoded "
              f"{stats.useful_tokens / stats.decode_tokens:.2f}; "
              f"correct {sum(r['correct'] for r in rows)}/{len(rows)}, "
              f"well formatted {sum(r['well_formatted'] for r in rows)}/{len(rows)}", flush=True)
    same = sum(a == b for a, b in zip(texts["padded"], texts["shared"]))
    print(f"evaluate ratio padded / shared time: {seconds['padded'] / seconds['shared']:.2f}x; "
          f"identical responses {same}/{len(items)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per path, alternating padded / shared")
    parser.add_argument("--padded-batch-size", type=int, default=16, help="the padded path's batch (the old preset)")
    parser.add_argument("--greedy-tokens", type=int, default=128, help="token cap of the reproducibility check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", type=int, default=0, metavar="N",
                        help="instead: evaluate.py's greedy generation on the last N CRUXEval-O items, both paths")
    parser.add_argument("--evaluate-tokens", type=int, default=512, help="token cap of --evaluate (evaluate.py's)")
    parser.add_argument("--dtype", help="the model's dtype (default: the project's, bf16 on a CPU); float32 shows "
                                        "whether the paths differ beyond bf16 rounding")
    args = parser.parse_args()
    models.set_torch_threads()
    if args.evaluate:
        return evaluation(args)
    cfg = Config(**PRESETS["cpu-demo"])
    policy, tokenizer = models.load_policy(args.model, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, dtype=args.dtype)
    mix = prompt_mix(tokenizer, cfg, args.seed)
    print(f"mix: {len(mix[0])} proposals, {len(mix[1])} learnability samples, {len(mix[2])} solver answers; "
          f"padded batch {args.padded_batch_size}, shared batch {cfg.generation_batch_size}", flush=True)
    totals = {"padded": GenerationStats(), "shared": GenerationStats()}
    for r in range(args.rounds):
        for name in ("padded", "shared"):
            torch.manual_seed(args.seed + r)
            batch = cfg.generation_batch_size if name == "shared" else args.padded_batch_size
            stats, _ = run_path(policy, tokenizer, mix, cfg, name == "shared", batch, cfg.temperature, cfg.top_p)
            totals[name].add(stats)
            print(f"round {r + 1} {name:6s} {stats.useful_tokens:5d} useful tokens in {stats.seconds:6.1f} s "
                  f"= {stats.useful_tokens / stats.seconds:5.1f} tok/s (prefill {stats.prefill_seconds:5.1f} s, "
                  f"{stats.prefill_tokens} positions; decode {stats.decode_seconds:6.1f} s, "
                  f"useful/decoded {stats.useful_tokens / stats.decode_tokens:.2f})", flush=True)
        # the padded path's prefill runs inside model.generate, so its time is counted as decode
    if args.rounds:
        rate = {k: s.useful_tokens / s.seconds for k, s in totals.items()}
        for name, s in totals.items():
            print(f"{name:6s} useful tok/s {rate[name]:5.1f}  useful/decoded {s.useful_tokens / s.decode_tokens:.2f}  "
                  f"prefill {s.prefill_seconds:6.1f} s  decode {s.decode_seconds:6.1f} s  total {s.seconds:6.1f} s")
        print(f"ratio shared / padded: useful tok/s {rate['shared'] / rate['padded']:.2f}x, "
              f"time for the same prompts {totals['padded'].seconds / totals['shared'].seconds:.2f}x")
    t0 = time.perf_counter()
    greedy = dict(temperature=0.0, top_p=1.0, cap_solve=args.greedy_tokens)
    _, padded = run_path(policy, tokenizer, mix, cfg, False, args.padded_batch_size, **greedy)
    _, shared = run_path(policy, tokenizer, mix, cfg, True, cfg.generation_batch_size, **greedy)
    _, regrouped = run_path(policy, tokenizer, mix, cfg, False, 4, **greedy)     # same path, other batch shapes
    same = lambda a, b: sum(x == y for x, y in zip(a, b))                      # noqa: E731
    print(f"greedy check ({args.greedy_tokens} tokens, {len(padded)} solver prompts, {time.perf_counter() - t0:.0f} s):"
          f" shared = padded {same(shared, padded)}/{len(padded)}; padded in batches of 4 = padded in batches of "
          f"{args.padded_batch_size} {same(regrouped, padded)}/{len(padded)} (the numerical noise of the batch shape)")

if __name__ == "__main__":
    main()
