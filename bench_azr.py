"""Benchmark the self-play loop against issue 4's CPU targets; prints every figure it checks.

    python bench_azr.py                 # both parts (about 25 minutes on a 2-core CPU)
    python bench_azr.py --part generation
    python bench_azr.py --part demo

generation: the loop's batched generate() against a plain batched model.generate on the same prompts,
            same batches, same seed (so the very same tokens), alternating, best of --repeats; ratio side by side.
demo:       runs the default `python azr.py` (cpu-demo preset) in a fresh process on the default model and
            reports time to the first logged iteration, total time, peak RSS, and the share of each
            iteration (wall time between consecutive metrics rows) spent outside generation / forward+backward
            (sandbox, tokenising, logging, plotting, checkpoints).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import azr
import model as models
from buffers import Buffers
from prompts import chat, propose_prompt, solve_prompt
from sandbox import FORBIDDEN_MODULES


def bench_generation(model_name: str, batch: int, max_new_tokens: int, repeats: int) -> None:
    cfg = azr.Config(model=model_name, generation_batch_size=batch)
    policy, tokenizer = models.load_policy(model_name, load_in_4bit=False, gradient_checkpointing=True)
    buffers = Buffers()
    texts = [propose_prompt(t, buffers[t].tasks, FORBIDDEN_MODULES, program=buffers["deduction"].tasks[0])
             for t in ("deduction", "abduction", "induction")]
    texts += [solve_prompt(buffers[t].tasks[0]) for t in ("deduction", "abduction", "induction")]
    prompts = [chat(tokenizer, texts[i % len(texts)]) for i in range(batch)]

    def loop_generate() -> int:
        out = azr.generate(policy, tokenizer, prompts, max_new_tokens, cfg, "loop", azr.Timer())
        return sum(len(response_ids) for _, response_ids, _ in out)

    def plain_generate() -> int:
        # the same batches the loop forms (sorted by prompt length), plain tokenizer + model.generate + decode
        encoded = sorted((tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts), key=len)
        tokens = 0
        for start in range(0, len(encoded), batch):
            inputs = tokenizer.pad({"input_ids": encoded[start:start + batch]}, return_tensors="pt")
            out = policy.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                  max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
            tokenizer.batch_decode(new, skip_special_tokens=True)
            eos = torch.tensor(sorted(set(policy.generation_config.eos_token_id
                                          if isinstance(policy.generation_config.eos_token_id, list)
                                          else [policy.generation_config.eos_token_id])))
            is_eos = torch.isin(new, eos)
            first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.tensor(new.shape[1]))
            tokens += int(first.sum())
        return tokens

    policy.eval()
    best = {"loop": 0.0, "plain": 0.0}
    for r in range(repeats):
        for name, fn in (("plain", plain_generate), ("loop", loop_generate)):
            torch.manual_seed(r)
            t0 = time.perf_counter()
            tokens = fn()
            rate = tokens / (time.perf_counter() - t0)
            best[name] = max(best[name], rate)
            print(f"generation  repeat {r}  {name:5s}  {tokens} tokens  {rate:7.1f} tokens/s", flush=True)
    print(f"generation  batch {batch} x {max_new_tokens} new tokens: loop {best['loop']:.1f} tokens/s, "
          f"plain model.generate {best['plain']:.1f} tokens/s, ratio {best['loop'] / best['plain']:.3f} "
          f"(target >= 0.90)")


def bench_demo(extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "azr.py", "--output-dir", str(run), *extra]
        print("demo  running:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=Path(__file__).parent)
        first = None
        while proc.poll() is None:
            time.sleep(1)
            if first is None and (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip():
                first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"demo failed with exit code {proc.returncode}")
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        print(f"demo  iterations {len(rows)}, first iteration logged after {first:.0f}s (target <= 300s), "
              f"finished after {total:.0f}s (target <= 1200s), peak RSS {rss:.2f} GiB (target <= 8)")
        # An iteration's full wall time is the gap between its row and the previous one, so it includes what
        # comes after the row is built (plot, checkpoint, summary line); the first row has no predecessor.
        for prev, r in zip(rows, rows[1:]):
            wall = r["timestamp"] - prev["timestamp"]
            busy = r["time/generation"] + r["time/update"]
            print(f"demo  it {r['iteration']}: wall {wall:.1f}s = generation {r['time/generation']:.1f} "
                  f"+ update {r['time/update']:.1f} + sandbox {r['time/sandbox']:.2f} + everything else "
                  f"{wall - busy - r['time/sandbox']:.2f}; outside generate/forward/backward "
                  f"{100 * (1 - busy / wall):.1f}% (target <= 5%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "generation", "demo"], default="all")
    ap.add_argument("--model", default=models.DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args, extra = ap.parse_known_args()
    models.set_torch_threads()
    if args.part in ("all", "generation"):
        bench_generation(args.model, args.batch, args.max_new_tokens, args.repeats)
    if args.part in ("all", "demo"):
        bench_demo(extra + ([] if args.model == models.DEFAULT_MODEL else ["--model", args.model]))


if __name__ == "__main__":
    main()
