"""Benchmark the default run, `python azr.py`, against its CPU targets; prints every figure it checks.

    python bench/bench_azr.py          # the default run on the default model (about 20 minutes on 2 cores)
    python bench/bench_azr.py --keep runs/bench_demo   # keep the run directory
    python bench/bench_azr.py --iterations 3           # any azr.py flag passes through

It runs azr.py in a fresh process and reads its metrics.jsonl: time to the first logged iteration, total time,
peak RSS, the share of each iteration (wall time between consecutive metrics rows) spent outside generation and
forward/backward, and the learning figures: proposals admitted to the buffers, buffer growth, validity and
format rates per group, solve rates, and generation throughput.
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


def bench_demo(extra: list[str], keep: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(keep) if keep else Path(tmp) / "run"
        cmd = [sys.executable, "azr.py", "--output-dir", str(run), *extra]
        print("demo  running:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
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
        learning_figures(rows)


def learning_figures(rows: list[dict]) -> None:
    """Per iteration: admitted proposals, buffers, and per group validity / format / solve rates, cap hits."""
    proposed = sum(r.get(k, 0) for r in rows for k in r if k.endswith("/propose/count"))
    admitted = sum(r["admitted"] for r in rows)
    print(f"learn  proposals admitted to the buffers: {admitted}/{proposed} = {admitted / max(proposed, 1):.0%} "
          f"(target >= 30%)")
    for r in rows:
        groups = sorted(k.rsplit("/", 1)[0] for k in r if k.endswith("/format_error_rate"))
        cells = []
        for g in groups:
            fmt = 1 - r[f"{g}/format_error_rate"]
            rate = r.get(f"{g}/validity_rate", r.get(f"{g}/solve_rate"))
            name = "valid" if g.endswith("propose") else "solve"
            cells.append(f"{g} {name} {rate:.2f} fmt {fmt:.2f} cap {r[f'{g}/truncated_rate']:.2f}")
        buffers = {k.split("/")[1]: v for k, v in r.items() if k.startswith("buffer/")}
        print(f"learn  it {r['iteration']}: admitted {r['admitted']} buffers {buffers} "
              f"{r['tokens_per_second']:.0f} tok/s | " + " | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", help="run directory to keep (default: a temporary one)")
    args, extra = ap.parse_known_args()
    bench_demo(extra, args.keep)


if __name__ == "__main__":
    main()
