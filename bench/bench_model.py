"""Benchmark the default model on this machine: one LoRA training step and batched generation, side by side.

    python bench/bench_model.py            # 8x256-token LoRA step (bf16 / fp32 / 4-bit NF4, +- gradient checkpointing)
                                     # and batch-8 x 128-new-token sampling (bf16 / fp32 / NF4)
    python bench/bench_model.py --quick    # tiny shapes, a smoke test of the script (about a minute)

Each configuration runs in its own process, so peak RSS is that configuration's alone. Besides wall time the
script prints process CPU seconds divided by the thread count ("cpu s/threads", "tok/cpu-s*thr"): the wall time
an otherwise idle machine would show, which stays comparable when other jobs share the cores (see loadavg).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def run_train(job: dict) -> dict:
    import torch

    import model as M

    threads = M.set_torch_threads()
    t0 = time.perf_counter()
    policy, tok = M.load_policy(job["model"], lora_r=16, lora_alpha=32, lora_dropout=0.05,
                                load_in_4bit=job["nf4"], gradient_checkpointing=job["gc"], device="cpu",
                                dtype=job["dtype"])
    load_s = time.perf_counter() - t0
    policy.train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 150_000, (job["batch"], job["seq"]), generator=g)
    mask = torch.ones_like(ids)
    times, cpu, loss = [], [], None
    for _ in range(job["steps"]):
        t, c = time.perf_counter(), time.process_time()
        out = policy(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        loss = out.loss.item()
    return {"load_s": load_s, "step_s": times, "cpu_s": cpu, "loss": loss, "threads": threads,
            "peak_rss_gb": peak_rss_gb(), "load_avg": os.getloadavg()[0]}


def run_gen(job: dict) -> dict:
    import torch

    import model as M

    threads = M.set_torch_threads()
    t0 = time.perf_counter()
    net, tok = M.load_for_eval(job["model"], device="cpu", dtype=job["dtype"], load_in_4bit=job["nf4"])
    load_s = time.perf_counter() - t0
    snippets = ["def f(a):\n    return a", "def f(s):\n    return s[::-1]", "def f(n):\n    return n * 2 + 1",
                "def f(xs):\n    return sorted(xs)", "def f(d):\n    return list(d)", "def f(x, y):\n    return x % y",
                "def f(t):\n    return t.upper()", "def f(l):\n    return sum(l)"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Predict the output of f('hi') for:\n{s}"}],
                                       tokenize=False, add_generation_prompt=True)
               for s in (snippets * 4)[: job["batch"]]]
    batch = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        net.generate(**batch, max_new_tokens=2, **kw)  # warm-up
        torch.manual_seed(0)
        t, c = time.perf_counter(), time.process_time()
        out = net.generate(**batch, max_new_tokens=job["new"], min_new_tokens=job["new"], **kw)
        sec, cpu = time.perf_counter() - t, time.process_time() - c
    new = (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]
    return {"load_s": load_s, "gen_s": sec, "cpu_s": cpu, "new_tokens": new, "tok_per_s": new / sec,
            "tok_per_cpu_s": new / cpu * threads, "load_avg": os.getloadavg()[0],
            "prompt_len": batch.input_ids.shape[1], "threads": threads, "peak_rss_gb": peak_rss_gb()}


def child(job: dict) -> None:
    result = run_train(job) if job["kind"] == "train" else run_gen(job)
    print("RESULT " + json.dumps(result), flush=True)


def run_job(job: dict, timeout: float) -> dict:
    try:
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    err = [l for l in p.stderr.strip().splitlines() if l.strip()]
    return {"error": err[-1][:200] if err else f"exit code {p.returncode}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes: check the script runs")
    ap.add_argument("--model", default=None, help="model to benchmark (default: the PyPI-shipped default model)")
    ap.add_argument("--only", choices=["train", "gen"], default=None)
    ap.add_argument("--no-nf4", action="store_true", help="skip the bitsandbytes 4-bit configurations")
    ap.add_argument("--steps", type=int, default=None, help="training steps per configuration (default 1; quick 2)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per configuration")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))

    import torch

    import model as M

    name = args.model or M.DEFAULT_MODEL
    path = M.resolve_model(name)  # assemble + convert once, outside the timings
    batch, seq, steps = (2, 64, 2) if args.quick else (8, 256, 1)
    steps = args.steps or steps
    gbatch, new = (2, 16) if args.quick else (8, 128)
    print(f"model {name} -> {path}")
    print(f"torch {torch.__version__}, default threads {torch.get_num_threads()}, using {M.set_torch_threads()}; "
          f"train batch {batch}x{seq} tokens, LoRA r=16 on {','.join(M.LORA_TARGETS)}, AdamW, {steps} step(s) "
          f"(the last is reported); generate batch {gbatch} x {new} new tokens, sampling T=1.0")

    dtypes = [("bf16", False), ("fp32", False)] + ([] if args.no_nf4 else [("bf16", True)])
    if args.only != "gen":
        print(f"\n{'train step':<16}{'wall s':>8}{'cpu s/threads':>15}{'peak RSS GiB':>14}{'load s':>8}"
              f"{'loadavg':>9}  loss")
        for dtype, nf4 in dtypes:
            for gc in (False, True):
                label = ("nf4/bf16" if nf4 else dtype) + (" +ckpt" if gc else "")
                r = run_job(dict(kind="train", model=path, dtype=dtype, nf4=nf4, gc=gc, batch=batch, seq=seq,
                                 steps=steps), args.timeout)
                if "error" in r:
                    print(f"{label:<16}failed: {r['error']}", flush=True)
                    continue
                print(f"{label:<16}{r['step_s'][-1]:>8.1f}{r['cpu_s'][-1] / r['threads']:>15.1f}"
                      f"{r['peak_rss_gb']:>14.2f}{r['load_s']:>8.1f}{r['load_avg']:>9.1f}  {r['loss']:.3f}", flush=True)
    if args.only != "train":
        print(f"\n{'generate':<16}{'tok/s':>8}{'tok/cpu-s*thr':>15}{'peak RSS GiB':>14}{'load s':>8}"
              f"{'loadavg':>9}  wall s, prompt len")
        for dtype, nf4 in dtypes:
            label = "nf4/bf16" if nf4 else dtype
            r = run_job(dict(kind="gen", model=path, dtype=dtype, nf4=nf4, batch=gbatch, new=new), args.timeout)
            if "error" in r:
                print(f"{label:<16}failed: {r['error']}", flush=True)
                continue
            print(f"{label:<16}{r['tok_per_s']:>8.1f}{r['tok_per_cpu_s']:>15.1f}{r['peak_rss_gb']:>14.2f}"
                  f"{r['load_s']:>8.1f}{r['load_avg']:>9.1f}  {r['gen_s']:.1f}, {r['prompt_len']}", flush=True)


if __name__ == "__main__":
    main()
