"""bench/bench_update.py — the TRR++ update, previous path against the current one, on one real default iteration.

It runs one iteration of the cpu-demo preset on the default model (propose, validate, learnability, solve: real
rollouts and advantages), then updates the same LoRA weights from the same rollouts in alternating rounds:

- previous: every micro-batch left-padded prompts + right-padded responses through the whole model, the LM head on
  the padded response columns at once, gradient checkpointing on (the CPU default until this change);
- current: `azr.policy_update`: each micro-batch is one packed row, the trie of its token sequences (a prefix
  several share runs once, nothing is padded), the LM head chunked over the response positions, gradient
  checkpointing only for micro-batches above cpu-demo's `--checkpoint-above-positions`.

It prints seconds per trained (response) token for each and their ratio, then a profile of one current update: by
pass (no-grad old log-probs, decoder forward, LM head with loss and the whole backward, optimizer); by operator
group; the positions it computes, prompt against response; the linear layers' arithmetic by part (LM head, MLP,
attention projections, LoRA), counted from those positions; and the rate that makes of the matmuls' time, against
one plain matmul on the same machine (how close the update runs to the CPU's arithmetic).

    python bench/bench_update.py                 # default model, 1 round per path (8-12 minutes on 2 cores)
    python bench/bench_update.py --rounds 2 --model PATH
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's flat modules
import azr  # noqa: E402
import model as models  # noqa: E402
from buffers import Buffers  # noqa: E402
from config import PRESETS, Config  # noqa: E402
from rewards import seed_task  # noqa: E402
from sandbox import Sandbox  # noqa: E402


def one_iteration(policy, tokenizer, cfg: Config) -> list[azr.Rollout]:
    """The rollouts (with advantages) the update of a fresh run's first iteration trains on."""
    rng = random.Random(cfg.seed)
    buffers = Buffers(cfg.task_types, capacity=cfg.buffer_capacity, seed=seed_task)
    counts = dict(zip(cfg.task_types, azr.split_counts(cfg.tasks_per_iteration, [1.0] * len(cfg.task_types))))
    timer = azr.Timer()
    with Sandbox(timeout=cfg.sandbox_timeout, memory_mb=cfg.sandbox_memory_mb) as sb:
        proposals, new_tasks = azr.propose(policy, tokenizer, sb, buffers, cfg, 1, rng, counts, False, timer)
        estimate = azr.learnability_tasks(proposals, cfg)
        batch = [t for task_type, n in counts.items()
                 for t in buffers[task_type].solver_batch(new_tasks[task_type], n, rng)]
        answers = azr.solve(policy, tokenizer, sb, estimate + batch, cfg, False, "solve", timer)
    azr.learnability(proposals, answers[:len(estimate)], buffers, cfg)
    samples = proposals + answers[len(estimate):]
    azr.task_relative_advantages(samples)
    return samples


def previous_logps(policy, batch: list[azr.Rollout], pad_id: int, temperature: float):
    """The previous path's forward: left/right padding, the LM head on every response column at once."""
    from trl.trainer.utils import pad, selective_log_softmax

    prompts = pad([torch.tensor(s.prompt_ids) for s in batch], pad_id, padding_side="left")
    responses = pad([torch.tensor(s.response_ids) for s in batch], pad_id, padding_side="right")
    prompt_mask = pad([torch.ones(len(s.prompt_ids), dtype=torch.long) for s in batch], 0, padding_side="left")
    response_mask = pad([torch.ones(len(s.response_ids), dtype=torch.long) for s in batch], 0, padding_side="right")
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    with models.lora_autocast(policy):
        logits = policy(input_ids=torch.cat([prompts, responses], 1), attention_mask=attention_mask,
                        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
                        logits_to_keep=responses.shape[1] + 1).logits
    logits = logits[:, :-1].float() / temperature
    return selective_log_softmax(logits, responses), logits, response_mask.float()


def previous_update(policy, optimizer, samples: list[azr.Rollout], cfg: Config, pad_id: int,
                    rng: random.Random) -> None:
    """The previous policy_update (entropy_coef and kl_coef 0, one process): same mini-batches, same loss."""
    from trl.trainer.utils import entropy_from_logits, pad

    policy.train()
    perm = rng.sample(range(len(samples)), len(samples))
    size = math.ceil(len(samples) / min(cfg.mini_batches, len(samples)))
    mini_batches = [perm[i:i + size] for i in range(0, len(perm), size)]

    def micro(indices: list[int]) -> list[list[int]]:
        order = sorted(indices, key=lambda i: len(samples[i].prompt_ids) + len(samples[i].response_ids))
        return [order[i:i + cfg.micro_batch_size] for i in range(0, len(order), cfg.micro_batch_size)]

    old: dict[int, torch.Tensor] = {}
    with torch.no_grad(), models.adapter_inputs_uncast(policy):
        for chunk in (c for mb in mini_batches[1:] for c in micro(mb)):
            logp, _, _ = previous_logps(policy, [samples[i] for i in chunk], pad_id, cfg.temperature)
            old.update({i: row[:len(samples[i].response_ids)] for i, row in zip(chunk, logp)})
    trainable = [p for p in policy.parameters() if p.requires_grad]
    for mini_batch in mini_batches:
        optimizer.zero_grad(set_to_none=True)
        tokens = sum(len(samples[i].response_ids) for i in mini_batch)
        for idx in micro(mini_batch):
            batch = [samples[i] for i in idx]
            with models.adapter_inputs_uncast(policy):
                logp, logits, mask = previous_logps(policy, batch, pad_id, cfg.temperature)
                old_logp = pad([old.setdefault(i, row[:len(s.response_ids)].detach())
                                for i, s, row in zip(idx, batch, logp)], 0.0, padding_side="right")
                advantages = torch.tensor([s.advantage for s in batch])[:, None]
                loss, _ = azr.clipped_policy_loss(logp, old_logp, advantages, cfg.clip_ratio)
                with torch.no_grad():
                    entropy_from_logits(logits)                     # the statistic it logged
                ((loss * mask).sum() / tokens).backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()


def set_checkpointing(policy, on: bool) -> None:
    causal_lm = policy.get_base_model()
    if on:
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        causal_lm.activation_checkpointing_disable()


def packed_counts(samples: list[azr.Rollout], cfg: Config, rng: random.Random) -> dict[str, int]:
    """The positions one current update computes: prompt and response nodes of its packed rows (a node holds a
    response token of some sequence, or only prompt tokens), those the no-grad pass computes again (mini-batches
    after the first) and those checkpointing recomputes (micro-batches above --checkpoint-above-positions)."""
    kept = [s for s in samples if s.response_ids]
    perm = rng.sample(range(len(kept)), len(kept))
    size = math.ceil(len(kept) / min(cfg.mini_batches, len(kept)))
    names = ("prompt nodes", "response nodes", "prompt tokens", "response tokens", "no-grad nodes",
             "no-grad response nodes", "recomputed nodes")
    counts = dict.fromkeys(names, 0)
    for k, mini_batch in enumerate(perm[i:i + size] for i in range(0, len(perm), size)):
        for idx in azr.micro_batches(kept, mini_batch, cfg.micro_batch_size):
            batch = [kept[i] for i in idx]
            tree = azr.TokenTree([s.prompt_ids + s.response_ids for s in batch])
            response = len({int(n) for s, path in zip(batch, tree.paths) for n in path[len(s.prompt_ids):]})
            nodes = len({int(n) for path in tree.paths for n in path})
            counts["response nodes"] += response
            counts["prompt nodes"] += nodes - response
            counts["prompt tokens"] += sum(len(s.prompt_ids) for s in batch)
            counts["response tokens"] += sum(len(s.response_ids) for s in batch)
            if k > 0:
                counts["no-grad nodes"] += nodes
                counts["no-grad response nodes"] += response
            if 0 < cfg.checkpoint_above_positions < azr.packed_positions(batch):
                counts["recomputed nodes"] += nodes
    return counts


def linear_flops(text, rank: int, counts: dict[str, int]) -> dict[str, float]:
    """The floating-point operations of the update's linear layers, by part, from the positions it computes: a
    frozen weight costs 2 per parameter and position forward and 2 backward (the gradient of its input only), a
    LoRA matrix 2 forward and 4 backward (input and weight); the LM head runs on response nodes only."""
    h, kv = text.hidden_size, text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    layers = text.num_hidden_layers
    frozen = {"attention projections": layers * (2 * h * h + 2 * h * kv),             # q, o; k, v
              "MLP": layers * 3 * h * text.intermediate_size}                         # gate, up, down
    lora = layers * rank * (6 * h + 2 * kv + 3 * (h + text.intermediate_size))   # r * (in + out) each
    grad = counts["prompt nodes"] + counts["response nodes"]
    forward_only = counts["no-grad nodes"] + counts["recomputed nodes"]
    flops = {part: n * (4 * grad + 2 * forward_only) for part, n in frozen.items()}
    flops["LoRA"] = lora * (6 * grad + 2 * forward_only)
    flops["LM head"] = text.vocab_size * h * (4 * counts["response nodes"] + 2 * counts["no-grad response nodes"])
    return flops


def matmul_rate(rows: int, inner: int, outer: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of this CPU's plain matmul [rows, inner] x [inner, outer] in `dtype` (the MLP's shape of a
    micro-batch)."""
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, outer, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * inner * outer * repeats / (time.perf_counter() - start) / 1e9


def profile(policy, samples: list[azr.Rollout], cfg: Config, state: dict) -> None:
    """One current update under torch.profiler: seconds by pass and by operator group; the positions it computes
    (prompt against response); the linear layers' arithmetic by part and its rate against a plain matmul's."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    policy.load_state_dict(state, strict=False)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    passes: dict[str, float] = defaultdict(float)
    original_step, original_logps, original_hidden = optimizer.step, azr.token_logps, azr.response_hidden

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        with record_function("optimizer"):
            out = original_step(*args, **kwargs)
        passes["optimizer step"] += time.perf_counter() - start
        return out

    def timed_logps(*args, **kwargs):              # only the no-grad old log-probs call it
        start = time.perf_counter()
        out = original_logps(*args, **kwargs)
        passes["forward (no-grad old log-probs)"] += time.perf_counter() - start
        return out

    def timed_hidden(*args, **kwargs):             # the decoder's forward in micro_batch_backward
        start = time.perf_counter()
        out = original_hidden(*args, **kwargs)
        if torch.is_grad_enabled():
            passes["decoder forward"] += time.perf_counter() - start
        return out

    optimizer.step, azr.token_logps, azr.response_hidden = timed_step, timed_logps, timed_hidden
    try:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:    # no record_shapes: it holds every tensor
            start = time.perf_counter()
            azr.policy_update(policy, optimizer, samples, cfg, azr.Timer(), random.Random(0))
            total = time.perf_counter() - start
    finally:
        azr.token_logps, azr.response_hidden = original_logps, original_hidden
    passes["LM head, loss, all of the backward"] = total - sum(passes.values())
    print(f"\nprofile of one current update ({total:.1f} s under the profiler), by pass:")
    for name, seconds in passes.items():
        print(f"  {name:36s} {seconds:7.1f} s  {100 * seconds / total:5.1f}%")
    counts = packed_counts(samples, cfg, random.Random(0))
    nodes = counts["prompt nodes"] + counts["response nodes"]
    print(f"positions with gradient: {nodes} in packed rows = {counts['prompt nodes']} prompt "
          f"({100 * counts['prompt nodes'] / nodes:.0f}%) + {counts['response nodes']} response nodes, from "
          f"{counts['prompt tokens']} prompt + {counts['response tokens']} response tokens unpacked; forward only: "
          f"{counts['no-grad nodes']} in the no-grad pass, {counts['recomputed nodes']} recomputed by checkpointing")
    groups = {"matmul (linear layers, LoRA, LM head)": ("mm", "addmm", "matmul", "linear"),
              "attention (sdpa, its batched matmuls)": ("scaled_dot_product", "flash_attention", "bmm", "baddbmm"),
              "log-softmax, logsumexp, softmax": ("softmax", "logsumexp", "gather"),
              "elementwise and copies (norms, rotary, SiLU, casts)": ("mul", "add", "copy_", "cat", "pow", "neg",
                                                                     "silu", "rsqrt", "mean", "sum", "div", "to",
                                                                     "where", "fill_", "sub", "exp")}
    seconds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        op = event.key.removeprefix("aten::")
        fused = ("scaled_dot_product", "flash_attention")       # matched anywhere in the operator's name
        group = next((g for g, ops in groups.items()
                      if any(op == o or op.startswith(o + "_") or (o in fused and o in op) for o in ops)), "other")
        seconds[group] += event.self_cpu_time_total / 1e6
    busy = sum(seconds.values())
    print("by operator group (self CPU time):")
    for group, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {group:52s} {s:7.1f} s  {100 * s / busy:5.1f}%")
    text = policy.get_base_model().config.get_text_config()
    flops = linear_flops(text, cfg.lora_r, counts)
    arithmetic = sum(flops.values())
    print("the linear layers' arithmetic, counted from the positions: " + ", ".join(
        f"{part} {f / 1e12:.2f} TFLOP ({100 * f / arithmetic:.0f}%)" for part, f in flops.items()))
    matmul = max(seconds["matmul (linear layers, LoRA, LM head)"], 1e-9)
    dtype = policy.get_base_model().get_output_embeddings().weight.dtype
    rows = min(1024, max(len(s.prompt_ids) + len(s.response_ids) for s in samples))
    peak = matmul_rate(rows, text.hidden_size, text.intermediate_size, dtype)
    print(f"{arithmetic / 1e12:.2f} TFLOP in {matmul:.1f} s of matmuls = {arithmetic / 1e9 / matmul:.0f} GFLOP/s; "
          f"one plain {str(dtype).removeprefix('torch.')} matmul at the MLP's shape ({rows} rows) on this machine: "
          f"{peak:.0f} GFLOP/s")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="hub id or local path (default: the default model)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per path")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile of the current update")
    args = ap.parse_args()
    models.set_torch_threads()
    torch.manual_seed(0)
    cfg = Config(**{**PRESETS["cpu-demo"], "model": args.model})
    policy, tokenizer = models.load_policy(args.model, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                           load_in_4bit=False, gradient_checkpointing=False, device="cpu")
    start = time.perf_counter()
    samples = [s for s in one_iteration(policy, tokenizer, cfg) if s.response_ids]
    prompt = sum(len(s.prompt_ids) for s in samples)
    tokens = sum(len(s.response_ids) for s in samples)
    print(f"one cpu-demo iteration's rollouts in {time.perf_counter() - start:.0f} s: {len(samples)} sequences, "
          f"{prompt} prompt + {tokens} response (trained) tokens", flush=True)
    with torch.no_grad():                       # as after a few steps: B nonzero, so both LoRA matrices get gradients
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    state = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k}
    trainable = [p for p in policy.parameters() if p.requires_grad]
    totals = {"previous": 0.0, "current": 0.0}
    weights = {}
    for rnd in range(1, args.rounds + 1):
        for path in totals:
            policy.load_state_dict(state, strict=False)             # same weights, same rollouts, same shuffle
            optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
            set_checkpointing(policy, path == "previous")
            start = time.perf_counter()
            if path == "previous":
                previous_update(policy, optimizer, samples, cfg, tokenizer.pad_token_id, random.Random(0))
            else:
                azr.policy_update(policy, optimizer, samples, cfg, azr.Timer(),
                                  random.Random(0))
            seconds = time.perf_counter() - start
            totals[path] += seconds
            weights[path] = torch.cat([p.detach().flatten().float() for p in trainable])
            print(f"round {rnd} {path:8s} update {seconds:6.1f} s  {1000 * seconds / tokens:6.1f} ms per trained token",
                  flush=True)
    policy.load_state_dict(state, strict=False)
    before = torch.cat([p.detach().flatten().float() for p in trainable])
    cos = float(torch.nn.functional.cosine_similarity((weights["previous"] - before).double(),
                                                      (weights["current"] - before).double(), dim=0))
    per_token = {path: 1000 * t / args.rounds / tokens for path, t in totals.items()}
    print(f"update per trained token: previous {per_token['previous']:.1f} ms, current {per_token['current']:.1f} ms: "
          f"{per_token['previous'] / per_token['current']:.2f}x faster; weight updates' cosine {cos:.4f} "
          f"(the sums run in another order, so close to 1 but not exact; the float32 equality is "
          f"tests/test_update.py)")
    if not args.no_profile:
        set_checkpointing(policy, False)
        profile(policy, samples, cfg, state)


if __name__ == "__main__":
    main()
