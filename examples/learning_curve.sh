#!/usr/bin/env bash
# Learning curve on this CPU: train the default model for a fixed wall-clock budget with periodic CRUXEval-O
# evaluation on a small held-out slice (the LAST --eval-limit items of the file), then compare base and final
# adapter on CRUXEval-O and CRUXEval-I over the last FINAL_LIMIT items (greedy, FINAL_TOKENS new tokens).
# Training never sees CRUXEval. What to read afterwards: runs/learning_curve/curves.png and metrics.jsonl
# (admitted, format-error rates, proposal validity, solve rates, eval/cruxeval-o), eval_base.json against
# eval_final.json.
#
#   BUDGET=60m bash examples/learning_curve.sh   # extra flags pass through to azr.py
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-60m}                 # wall-clock budget of the training phase (timeout(1) syntax)
RUN=${RUN:-runs/learning_curve}
DATA=${DATA:-data/cruxeval/cruxeval.jsonl}
EVAL_LIMIT=${EVAL_LIMIT:-50}          # held-out items per evaluation
EVAL_EVERY=${EVAL_EVERY:-3}           # iterations between evaluations (each costs a few minutes on CPU)
TOKENS=${TOKENS:-256}                 # = the cpu-demo preset's --max-new-tokens-solve, used by the in-loop eval
FINAL_LIMIT=${FINAL_LIMIT:-200}       # held-out items for the base/final comparison
FINAL_TOKENS=${FINAL_TOKENS:-512}
mkdir -p "$RUN"

# 0. the base model on the held-out slice
python evaluate.py --benchmarks cruxeval-o cruxeval-i --data "$DATA" --limit "$FINAL_LIMIT" --from-end \
    --max-new-tokens "$FINAL_TOKENS" --output "$RUN/eval_base.json"

# 1. self-play until the budget runs out; SIGINT makes azr.py stop (exit 130) and the last finished
#    iteration's checkpoint stays, so `python azr.py --resume $RUN --iterations N` can continue it
timeout --signal=INT "$BUDGET" python azr.py --output-dir "$RUN" --iterations 1000 \
    --eval-every "$EVAL_EVERY" --eval-limit "$EVAL_LIMIT" --eval-data "$DATA" \
    --max-new-tokens-solve "$TOKENS" "$@" || echo "training stopped (budget $BUDGET reached or interrupted)"

# 2. the trained adapter on the same slice, same settings
python evaluate.py --benchmarks cruxeval-o cruxeval-i --data "$DATA" --limit "$FINAL_LIMIT" --from-end \
    --max-new-tokens "$FINAL_TOKENS" --adapter "$RUN/checkpoint/adapter" --output "$RUN/eval_final.json"

# 3. what moved: first vs last logged iteration
python - "$RUN" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
first, last = rows[0], rows[-1]
keys = sorted(k for k in last if k.endswith(("format_error_rate", "validity_rate", "solve_rate", "reward_mean"))
              or k.startswith("eval/") or k in ("admitted", "admitted_share"))
print(f"iterations {first['iteration']}..{last['iteration']}")
for k in keys:
    a, b = first.get(k), last.get(k)
    print(f"{k:<45} {'-' if a is None else f'{a:.3f}':>8} -> {'-' if b is None else f'{b:.3f}':>8}")
# the targets, first quarter of iterations against last quarter
samples = [json.loads(l) for l in (run / "samples.jsonl").read_text().splitlines() if l.strip()]
quarter = max(1, len(rows) // 4)
for label, part in (("first quarter", rows[:quarter]), ("last quarter", rows[-quarter:])):
    its = {r["iteration"] for r in part}
    proposals = sum(v for r in part for k, v in r.items() if k.endswith("/propose/count"))
    share = sum(r["admitted"] for r in part) / max(proposals, 1)
    fmt = {}  # over every response (metrics.jsonl); samples.jsonl keeps only --samples-per-group of each group
    for role in ("/propose", "/solve"):
        counts = [(v, r[k[:-len("count")] + "format_error_rate"]) for r in part for k, v in r.items()
                  if k.endswith(role + "/count")]
        fmt[role] = sum(n * (1 - e) for n, e in counts) / max(sum(n for n, _ in counts), 1)
    valid_proposals = [s for s in samples if s["iteration"] in its and s["group"].endswith("/propose") and s["valid"]]
    valid = [s["reward"] for s in valid_proposals]
    new = [s["reward"] for s in valid_proposals if s["reason"] != "duplicate"]  # copies: reason "duplicate"
    print(f"{label:<14} iterations {min(its)}-{max(its)}: admitted share {share:.2f}, proposer format "
          f"{fmt['/propose']:.2f}, solver format {fmt['/solve']:.2f}, mean reward of valid proposals "
          f"{sum(valid) / max(len(valid), 1):+.2f} over {len(valid)}, of new (non-duplicate) ones "
          f"{sum(new) / max(len(new), 1):+.2f} over {len(new)} (samples.jsonl)")
# each (iteration, task type) proposer group is whitened alone: a copy rewarded above its group's mean is reinforced
group_rewards = {}
for s in samples:
    if s["group"].endswith("/propose"):
        group_rewards.setdefault((s["iteration"], s["group"]), []).append(s["reward"])
copies = [s for s in samples
          if s["group"].endswith("/propose") and s.get("reason") == "duplicate" and s["well_formatted"]]
group_size = {(r["iteration"], k[:-len("/count")]): v
              for r in rows for k, v in r.items() if k.endswith("/propose/count")}
if all(len(group_rewards.get(key, [])) == n for key, n in group_size.items()):
    group_mean = {key: sum(rewards) / len(rewards) for key, rewards in group_rewards.items()}
    gaps = [s["reward"] - group_mean[(s["iteration"], s["group"])] for s in copies]
    print(f"well-formatted copies {len(copies)}: above their group's mean reward (reinforced) "
          f"{sum(d > 1e-9 for d in gaps)}, below it {sum(d < -1e-9 for d in gaps)}, "
          f"at it (no signal) {sum(abs(d) <= 1e-9 for d in gaps)}")
else:  # a group's mean needs all its rewards
    print("well-formatted copies: not counted against their group's mean, since samples.jsonl does not hold every "
          "proposal (raise --samples-per-group to the proposals per task type)")
for name in ("eval_base", "eval_final"):
    for bench, r in json.loads((run / f"{name}.json").read_text())["results"].items():
        print(f"{name:<12} {bench} {r['correct']}/{r['n']} = {r['accuracy']:.3f}  format {r['format_ok']:.2f}")
PY
