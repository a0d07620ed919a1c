"""Proposer-reward variants: what a task the solver always (or never) solves is worth to the proposer.

The learnability reward is 1 - r for a solve rate r in (0, 1). At r = 0 or r = 1 the paper's Eq. 4 gives 0,
while the official code gives -0.5 (--proposer-extreme-reward). This runs both from the same seed, one after
the other, into OUTPUT_DIR/extreme_0.0 and OUTPUT_DIR/extreme_-0.5, and prints their last metrics side by side:
a negative extreme reward pushes the proposer harder away from trivial and impossible tasks.

    python examples/proposer_reward_variants.py                     # cpu-demo sizes, default model (2 runs)
    python examples/proposer_reward_variants.py --iterations 20     # any azr.py flag is passed through
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402

VARIANTS = {"paper (Eq. 4)": 0.0, "official code": -0.5}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path("runs/proposer_reward_variants")
    if "--output-dir" in argv:                      # each variant gets a subfolder of the given directory
        i = argv.index("--output-dir")
        out = Path(argv[i + 1])
        del argv[i:i + 2]
    rows = {}
    for name, extreme in VARIANTS.items():
        run_dir = out / f"extreme_{extreme}"
        code = azr.main(["--proposer-extreme-reward", str(extreme), "--output-dir", str(run_dir)] + argv)
        if code:
            return code
        rows[name] = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    keys = sorted(k for k in set().union(*rows.values())
                  if k.endswith(("/propose/reward_mean", "/propose/validity_rate", "/solve/solve_rate")))
    print(f"\n{'last iteration':<40}" + "".join(f"{name:>16}" for name in rows))
    for k in keys:
        print(f"{k:<40}" + "".join(f"{azr.fmt(r.get(k)):>16}" for r in rows.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
