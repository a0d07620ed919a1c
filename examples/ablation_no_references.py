"""Ablation (paper Table 2): the proposer sees no reference tasks (K = 0).

Normally the proposer is shown K = 6 tasks sampled from the buffer and asked to write a different one, which
drives diversity; here its prompt says "(none)". In the paper's ablation this lowered the average score.
Induction still receives a buffer program to write inputs for: that program is the task, not a reference.

    python examples/ablation_no_references.py                  # default model; cpu-demo preset on CPU, paper on GPU
    python examples/ablation_no_references.py --iterations 20  # any azr.py flag passes through
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402

FLAGS = ["--num-references", "0", "--output-dir", "runs/ablation_no_references"]


def main(argv: list[str] | None = None) -> int:
    return azr.main(FLAGS + list(sys.argv[1:] if argv is None else argv))   # later flags win


if __name__ == "__main__":
    sys.exit(main())
