"""Ablation (paper Table 2): the proposer keeps proposing but is never updated.

Proposals are still sampled, validated and scored for learnability (their rewards are logged), but only the
solver rollouts enter the TRR++ update, so the proposer never learns to aim at learnable tasks. In the
paper's ablation this scored below training both roles.

    python examples/ablation_solver_only.py                  # default model; cpu-demo preset on CPU, paper on GPU
    python examples/ablation_solver_only.py --iterations 20  # any azr.py flag passes through
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402

FLAGS = ["--no-train-proposer", "--output-dir", "runs/ablation_solver_only"]


def main(argv: list[str] | None = None) -> int:
    return azr.main(FLAGS + list(sys.argv[1:] if argv is None else argv))   # later flags win


if __name__ == "__main__":
    sys.exit(main())
