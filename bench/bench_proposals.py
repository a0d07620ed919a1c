"""bench/bench_proposals.py — what makes the model write valid tasks? A probe of the proposer prompt, per cell.

Each cell is a template x sampling setting x reference source. It samples `--samples` proposals, split evenly over
`--task-types` (by default deduction, abduction, induction), through the loop's own steps 1-2 (azr.propose:
prompts, generation, parsing, validation in the real sandbox). It prints, per cell and task type, how many
proposals were valid (admitted to the buffer), well formatted (proposer reward above -1), hit the token cap, and
why the others failed.

    python bench/bench_proposals.py                               # default model, the cells below, 24 samples each
    python bench/bench_proposals.py --cells r1:1.0:1.0:identity:compact chat:0.6:0.95:identity --samples 48
    python bench/bench_proposals.py --cells r1:1.0:1.0:seed-file:compact --task-types induction --samples 48 \
        --induction-inputs 4                                          # induction alone, on the official seeds' programs
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402
import model as models  # noqa: E402
from buffers import Buffers  # noqa: E402
from config import SEED_FILES, Config  # noqa: E402
from rewards import BUILTIN_TASK_TYPES, seed_task  # noqa: E402
from sandbox import Sandbox  # noqa: E402

DEFAULT_CELLS = ["r1:1.0:1.0:identity", "r1:1.0:1.0:identity:compact", "r1:0.6:0.95:identity:compact",
                 "chat:1.0:1.0:identity:compact"]


def reference_buffers(source: str, sb: Sandbox) -> Buffers:
    """The identity seed only, or the shipped official seed tasks, loaded as the loop's --seed-file loads them."""
    buffers = Buffers(BUILTIN_TASK_TYPES, seed=seed_task)
    if source == "seed-file":
        azr.load_seed_files(sb, buffers, Config(seed_file=list(SEED_FILES)))
    return buffers


def run_cell(policy, tokenizer, sb: Sandbox, cell: str, samples: int, max_new_tokens: int, k: int, seed: int,
             induction_inputs: int, task_types: list[str]) -> dict:
    """One cell through the loop's own steps 1-2 (azr.propose: prompts, generation, parsing, validation)."""
    template, temperature, top_p, source, *style = cell.split(":")
    cfg = Config(template=template, temperature=float(temperature), top_p=float(top_p), num_references=k,
                 proposer_prompt=style[0] if style else "official", induction_inputs=induction_inputs,
                 max_new_tokens_propose=max_new_tokens, generation_batch_size=samples)
    counts = dict(zip(task_types, azr.split_counts(samples, [1.0] * len(task_types))))
    timer = azr.Timer()
    out, _ = azr.propose(policy, tokenizer, sb, reference_buffers(source, sb), cfg, 1, random.Random(seed), counts,
                         False, timer)
    rows = {}
    for task_type in task_types:
        mine = [s for s in out if s.task_type == task_type]
        rows[task_type] = {
            "n": len(mine), "valid": sum(s.validation.valid for s in mine),
            "well_formatted": sum(s.well_formatted for s in mine),
            "valid_and_formatted": sum(s.validation.valid and s.well_formatted for s in mine),
            "cap_hits": sum(s.truncated for s in mine),
            "failures": Counter(reason_kind(s.validation.reason) for s in mine if not s.validation.valid).most_common(),
            "samples": [{"prompt": s.prompt, "response": s.response, "valid": s.validation.valid,
                         "reason": s.validation.reason, "well_formatted": s.well_formatted} for s in mine],
        }
    seconds = timer.seconds["generation"]
    return {"cell": cell, "seconds": round(seconds, 1), "tokens": timer.tokens,
            "tokens_per_second": round(timer.tokens / max(seconds, 1e-9), 1), "types": rows}


def reason_kind(reason: str | None) -> str:
    """The failure reason without its details (the first clause)."""
    return (reason or "").split(":")[0].split(" (")[0][:60]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.DEFAULT_MODEL)
    parser.add_argument("--cells", nargs="+", default=DEFAULT_CELLS,
                        help="template:temperature:top_p:references[:prompt], references identity or seed-file, "
                             "prompt official (default) or compact (azr.py --proposer-prompt)")
    parser.add_argument("--samples", type=int, default=24, help="proposals per cell, split over the task types")
    parser.add_argument("--task-types", nargs="+", default=list(BUILTIN_TASK_TYPES), choices=BUILTIN_TASK_TYPES,
                        help="the task types proposed (e.g. induction alone, for its own cells)")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--references", type=int, default=2, help="K reference tasks per prompt")
    parser.add_argument("--induction-inputs", type=int, default=10, help="inputs an induction proposal asks for")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/bench_proposals.json")
    args = parser.parse_args()
    models.set_torch_threads()
    policy, tokenizer = models.load_policy(args.model)
    report = []
    with Sandbox() as sb:
        for cell in args.cells:
            torch.manual_seed(args.seed)
            row = run_cell(policy, tokenizer, sb, cell, args.samples, args.max_new_tokens, args.references, args.seed,
                           args.induction_inputs, args.task_types)
            report.append(row)
            total = {k: sum(r[k] for r in row["types"].values()) for k in ("n", "valid", "well_formatted",
                                                                            "valid_and_formatted", "cap_hits")}
            print(f"{cell:28s} valid {total['valid']:2d}/{total['n']}  formatted {total['well_formatted']:2d}  "
                  f"valid+formatted {total['valid_and_formatted']:2d}  cap hits {total['cap_hits']:2d}  "
                  f"{row['tokens_per_second']:.0f} tok/s  {row['seconds']:.0f}s", flush=True)
            for task_type, r in row["types"].items():
                print(f"    {task_type:10s} valid {r['valid']}/{r['n']} formatted {r['well_formatted']} "
                      f"cap {r['cap_hits']}  failures {r['failures']}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
