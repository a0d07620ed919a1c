"""The paper's ablations (Table 2) and other one-flag-set variants of `python azr.py`, one command each.

Each ablation is a named list of azr.py flags; anything after the name is passed through to azr.py, and later
flags win. Each writes to runs/<name> unless --output-dir is given. Compare its metrics.jsonl and held-out
CRUXEval curve (--eval-every) with a full run of `python azr.py`.

    python examples/ablations.py --list                         # the ablations and what each changes
    python examples/ablations.py deduction-only                 # default model; cpu-demo preset on CPU
    python examples/ablations.py no-references --iterations 20  # any azr.py flag passes through

Each ablation, its flags, and what it tests:

    deduction-only        --task-types deduction
                          one task type (paper: lower average score)
    no-induction          --task-types deduction abduction
                          without induction (paper: lower)
    no-references         --num-references 0
                          the proposer sees no K reference tasks (paper: lower); induction still gets its program
    solver-only           --no-train-proposer
                          proposals sampled and scored, but only the solver is updated (paper: lower)
    force-accept-warmup   --strict-proposals --force-accept-tasks --lenient-answers --task-distribution 0.3 0.3 0.4
                          strict soft checks; while iteration < --force-accept-threshold (50), tasks that fail only
                          them are admitted and solver answers are parsed leniently

The proposer-reward variants (with an added reward term) and a custom task type have their own scripts in this folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402

ABLATIONS: dict[str, list[str]] = {
    "deduction-only": ["--task-types", "deduction"],
    "no-induction": ["--task-types", "deduction", "abduction"],
    "no-references": ["--num-references", "0"],
    "solver-only": ["--no-train-proposer"],
    "force-accept-warmup": ["--strict-proposals", "--force-accept-tasks", "--lenient-answers",
                            "--task-distribution", "0.3", "0.3", "0.4"],
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("--list", "-h", "--help"):
        print(__doc__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in ABLATIONS:
        print(f"ablations.py: unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}", file=sys.stderr)
        return 2
    return azr.main(ABLATIONS[name] + ["--output-dir", f"runs/{name}"] + rest)   # later flags win


if __name__ == "__main__":
    sys.exit(main())
