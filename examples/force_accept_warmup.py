"""Seed 003 warm-up: force-accept proposals during the first iterations.

While iteration < --force-accept-threshold (seed 003: 50), any proposal that parses and runs deterministically
is accepted even if it fails the soft checks (think/answer tags, duplicates, trivial outputs), and solver
answers are parsed leniently (no format penalty). A weak base model thus fills its buffers before the strict
rules start; `force_accepted` in metrics.jsonl counts the tasks let in this way. With seed 003's
distribution 0.3 / 0.3 / 0.4 over deduction / abduction / induction.

    python examples/force_accept_warmup.py                  # default model; cpu-demo preset on CPU, paper on GPU
    python examples/force_accept_warmup.py --iterations 20  # any azr.py flag passes through
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402

FLAGS = ["--force-accept-tasks", "--force-accept-threshold", "50", "--task-distribution", "0.3", "0.3", "0.4",
         "--output-dir", "runs/force_accept_warmup"]


def main(argv: list[str] | None = None) -> int:
    return azr.main(FLAGS + list(sys.argv[1:] if argv is None else argv))   # later flags win


if __name__ == "__main__":
    sys.exit(main())
