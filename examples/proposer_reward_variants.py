"""Proposer-reward variants: the extreme reward, and how to add a reward term to the proposer's reward.

A valid, well-formatted proposal earns the learnability reward 1 - r for a solve rate r in (0, 1). At r = 0 or 1
the paper's Eq. 4 gives 0 and the official code -0.5 (--proposer-extreme-reward). A reward term is a function
(task, the tasks of its buffer) -> float: appended to azr.PROPOSER_REWARD_TERMS, it is added to the reward of
every proposal that learnability scores. This file writes two, which the paper tried as additions (it reports no
gain): diversity (1 - the largest token-Jaccard similarity to a buffered task) and complexity (the program's AST
node count / 200, at most 1), each weighted 0.5 here.

Each variant runs from the same seed, one after the other, into OUTPUT_DIR/<variant>, and the last metrics are
printed side by side.

    python examples/proposer_reward_variants.py                     # cpu-demo sizes, default model (4 runs)
    python examples/proposer_reward_variants.py --iterations 20     # any azr.py flag is passed through
"""
import ast
import io
import json
import sys
import tokenize
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402
from buffers import Task, normalize_program  # noqa: E402

WEIGHT = 0.5          # of each added term
COMPLEXITY_SCALE = 200  # AST nodes for a complexity of 1


def tokens(task: Task) -> Counter:
    """The Python tokens of the normalised program and its input(s), as a multiset."""
    text = normalize_program(task.program) + "\n" + (task.input or "\n".join(task.inputs))
    skip = (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER, tokenize.COMMENT)
    try:
        return Counter(t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in skip)
    except (tokenize.TokenError, SyntaxError, ValueError):
        return Counter(text.split())


def diversity(task: Task, buffered: list[Task]) -> float:
    """1 - the largest multiset Jaccard similarity of its tokens to a buffered task's (1.0 for an empty buffer)."""
    mine = tokens(task)
    overlaps = [(mine & other, mine | other) for other in map(tokens, buffered)]
    return 1.0 - max((sum(a.values()) / max(sum(b.values()), 1) for a, b in overlaps), default=0.0)


def complexity(task: Task, buffered: list[Task]) -> float:
    """The program's AST node count / COMPLEXITY_SCALE, at most 1; 0 if it does not parse."""
    try:
        return min(1.0, sum(1 for _ in ast.walk(ast.parse(task.program))) / COMPLEXITY_SCALE)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return 0.0


# name -> (--proposer-extreme-reward, reward terms)
VARIANTS: dict[str, tuple[float, list[Callable[[Task, list[Task]], float]]]] = {
    "paper-eq4": (0.0, []),
    "official": (-0.5, []),
    "diversity": (-0.5, [lambda task, buffered: WEIGHT * diversity(task, buffered)]),
    "complexity": (-0.5, [lambda task, buffered: WEIGHT * complexity(task, buffered)]),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path("runs/proposer_reward_variants")
    if "--output-dir" in argv:                      # each variant gets a subfolder of the given directory
        i = argv.index("--output-dir")
        out = Path(argv[i + 1])
        del argv[i:i + 2]
    rows = {}
    for name, (extreme, terms) in VARIANTS.items():
        azr.PROPOSER_REWARD_TERMS[:] = terms
        try:
            code = azr.main(["--proposer-extreme-reward", str(extreme), "--output-dir", str(out / name)] + argv)
        finally:
            azr.PROPOSER_REWARD_TERMS.clear()
        if code:
            return code
        rows[name] = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[-1])
    keys = sorted(k for k in set().union(*rows.values())
                  if k.endswith(("/propose/reward_mean", "/propose/validity_rate", "/solve/solve_rate")))
    print(f"\n{'last iteration':<40}" + "".join(f"{name:>12}" for name in rows))
    for k in keys:
        print(f"{k:<40}" + "".join(f"{azr.fmt(r.get(k)):>12}" for r in rows.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
