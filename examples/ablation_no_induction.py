"""Ablation (paper Table 2): self-play on deduction and abduction only.

Induction (infer the program from input/output pairs and a message) is left out; in the paper's ablation this
lowered the average score. Compare with a full run of `python azr.py`.

    python examples/ablation_no_induction.py                  # default model; cpu-demo preset on CPU, paper on GPU
    python examples/ablation_no_induction.py --iterations 20  # any azr.py flag passes through
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402

FLAGS = ["--task-types", "deduction", "abduction", "--output-dir", "runs/ablation_no_induction"]


def main(argv: list[str] | None = None) -> int:
    return azr.main(FLAGS + list(sys.argv[1:] if argv is None else argv))   # later flags win


if __name__ == "__main__":
    sys.exit(main())
