"""Ablation (paper Table 2): self-play with one task type, predict the output.

AZR proposes and solves only deduction tasks; in the paper's ablation, dropping abduction and induction
lowered the average score. Compare its held-out CRUXEval-O curve (--eval-every) and
its metrics.jsonl with a full run of `python azr.py`.

    python examples/ablation_deduction_only.py                  # default model; cpu-demo preset on CPU, paper on GPU
    python examples/ablation_deduction_only.py --iterations 20  # any azr.py flag passes through
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402

FLAGS = ["--task-types", "deduction", "--output-dir", "runs/ablation_deduction_only"]


def main(argv: list[str] | None = None) -> int:
    return azr.main(FLAGS + list(sys.argv[1:] if argv is None else argv))   # later flags win


if __name__ == "__main__":
    sys.exit(main())
