"""Benchmark (not a test): validate the 800 CRUXEval programs with repeats=2, three ways, side by side.

    python bench/bench_sandbox.py [--data data/cruxeval/cruxeval.jsonl] [--workers N] [--rounds 3]

1. this sandbox (fork-server workers, rlimits, namespaces, Landlock, seccomp; repeats=2 runs each program in
   two separate confined processes and compares them in the parent);
2. a fresh `python -I` subprocess per program with the same rlimits, running f twice (the careful naive way);
3. unsandboxed in-process exec, f twice (the ceiling; unsafe).
Each way runs the same number of rounds over the 800 and reports its best round: how many outputs match the
stored `output` (same_output) and programs/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
from sandbox import Sandbox, same_output  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data/cruxeval/cruxeval.jsonl"

# The naive way: one fresh interpreter per program, same rlimits as the sandbox children, f run twice.
RUNNER = r"""
import json, resource, sys
job = json.loads(sys.stdin.read())
mem, cpu = job["memory_mb"] << 20, job["cpu"]
for res, lim in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_NPROC, 0),
                 (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(res, (lim, lim))
outs = []
for _ in range(2):
    ns = {"__name__": "__main__"}
    exec(job["program"], ns)
    outs.append(repr(eval("f(" + job["inputs"] + "\n)", ns)))
sys.stdout.write(json.dumps({"output": outs[0] if outs[0] == outs[1] else None}))
"""


def run_subprocess(job: tuple[str, str], timeout: float, memory_mb: int) -> str | None:
    payload = json.dumps({"program": job[0], "inputs": job[1], "memory_mb": memory_mb, "cpu": int(timeout) + 1})
    try:
        p = subprocess.run([sys.executable, "-I", "-c", RUNNER], input=payload, capture_output=True, text=True,
                           timeout=timeout, env={}, cwd="/tmp")
        return json.loads(p.stdout)["output"] if p.returncode == 0 else None
    except (subprocess.TimeoutExpired, ValueError, KeyError):
        return None


def run_inprocess(job: tuple[str, str]) -> str | None:
    try:
        outs = []
        for _ in range(2):
            ns: dict = {"__name__": "__main__"}
            exec(job[0], ns)  # noqa: S102 - the unsafe ceiling, on trusted benchmark programs only
            outs.append(repr(eval(f"f({job[1]}\n)", ns)))  # noqa: S307
        return outs[0] if outs[0] == outs[1] else None
    except Exception:
        return None


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workers", type=int, default=None, help="sandbox workers / subprocess threads (default: cores)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the 800 for each way (best is reported)")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--memory-mb", type=int, default=1024)
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(f"no data at {args.data}")
    rows = [json.loads(line) for line in args.data.open()]
    jobs = [(r["code"], r["input"]) for r in rows]
    gold = [r["output"] for r in rows]
    workers = args.workers or os.cpu_count() or 1
    n = len(jobs)
    print(f"{n} CRUXEval programs, repeats=2, {workers} workers, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}")

    def report(name: str, outs: list, seconds: float, extra: str = "") -> float:
        ok = sum(same_output(o, g) for o, g in zip(outs, gold))
        exact = sum(o == g for o, g in zip(outs, gold))
        rate = n / seconds
        print(f"{name:<52} {ok}/{n} correct ({exact} exact)  {rate:8.1f} programs/s{extra}")
        return rate

    cpu0 = cpu_seconds()
    with Sandbox(timeout=args.timeout, memory_mb=args.memory_mb, workers=workers) as sb:
        caps = sb.capabilities  # start-up is not part of the measurement
        best, outs = float("inf"), []
        for _ in range(args.rounds):
            t = time.perf_counter()
            results = sb.run_many(jobs, repeats=2)
            best = min(best, time.perf_counter() - t)
            outs = [r.output for r in results]
    cpu_per = (cpu_seconds() - cpu0 + 1e-9) / (n * args.rounds)
    iso = ", ".join(k for k, v in caps.items() if v is True)
    rate_sb = report("sandbox (fork server + isolation)", outs, best,
                     f"  [{cpu_per * 1e3:.2f} CPU-ms/program; isolation: {iso}]")

    best = float("inf")
    with ThreadPoolExecutor(workers) as pool:
        for _ in range(args.rounds):
            t = time.perf_counter()
            outs = list(pool.map(lambda j: run_subprocess(j, args.timeout, args.memory_mb), jobs))
            best = min(best, time.perf_counter() - t)
    rate_sub = report("fresh `python -I` subprocess per program (rlimits)", outs, best)

    best = float("inf")
    for _ in range(args.rounds):
        t = time.perf_counter()
        outs = [run_inprocess(j) for j in jobs]
        best = min(best, time.perf_counter() - t)
    report("unsandboxed in-process exec (ceiling, 1 core)", outs, best)
    print(f"sandbox speed-up over fresh subprocess: {rate_sb / rate_sub:.1f}x")
    cores = os.cpu_count() or 1
    print(f"sandbox CPU-bound capacity on {cores} idle cores: {cores / cpu_per:.0f} programs/s "
          f"({cpu_per * 1e3:.2f} CPU-ms per program, all processes; other load on the machine inflates it)")


if __name__ == "__main__":
    main()
