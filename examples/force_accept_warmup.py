"""Warm-up with strict proposal checks: force-accept proposals during the first iterations.

With --strict-proposals the loop also rejects trivial tasks, non-literal outputs and induction tasks without a
message. While iteration < --force-accept-threshold (50 here), a proposal that fails only those checks is
admitted anyway, and solver answers are parsed leniently (no format penalty). A weak base model thus fills its
buffers before the strict rules start; `force_accepted` in metrics.jsonl counts the tasks let in this way. The
task distribution is 0.3 / 0.3 / 0.4 over deduction / abduction / induction.

    python examples/force_accept_warmup.py                  # default model; cpu-demo preset on CPU, paper on GPU
    python examples/force_accept_warmup.py --iterations 20  # any azr.py flag passes through
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402

FLAGS = ["--strict-proposals", "--force-accept-tasks", "--force-accept-threshold", "50", "--task-distribution", "0.3", "0.3", "0.4",
         "--output-dir", "runs/force_accept_warmup"]


def main(argv: list[str] | None = None) -> int:
    return azr.main(FLAGS + list(sys.argv[1:] if argv is None else argv))   # later flags win


if __name__ == "__main__":
    sys.exit(main())
