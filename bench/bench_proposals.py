"""bench/bench_proposals.py — what makes the model write valid tasks? A probe of the proposer prompt, per cell.

Each cell is a template x sampling setting x reference source. It samples `--samples` proposals, split evenly over
`--task-types` (by default deduction, abduction, induction), through the loop's own code: propose_prompt, render,
generate, parse_proposal and validate_proposals in the real sandbox. It prints, per cell and task type, how many
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
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402
import model as models  # noqa: E402
from buffers import Buffers  # noqa: E402
from config import Config  # noqa: E402
from generation import generate  # noqa: E402
from prompts import RESPONSE_PREFIX, render  # noqa: E402
from rewards import BUILTIN_TASK_TYPES, parse_proposal, propose_prompt, seed_task, validate_proposals  # noqa: E402
from sandbox import Sandbox  # noqa: E402

SEED_FILES = ["data/azr-seeds/3b_coder_seed_io.jsonl", "data/azr-seeds/3b_coder_code_f_seed_io.jsonl"]
DEFAULT_CELLS = ["r1:1.0:1.0:identity", "r1:1.0:1.0:identity:compact", "r1:0.6:0.95:identity:compact",
                 "chat:1.0:1.0:identity:compact"]


def reference_buffers(source: str, sb: Sandbox) -> Buffers:
    """The identity seed only, or the shipped official seed tasks, loaded as the loop's --seed-file loads them."""
    buffers = Buffers(BUILTIN_TASK_TYPES, seed=seed_task)
    if source == "seed-file":
        repo = Path(__file__).resolve().parents[1]
        azr.load_seed_files(sb, buffers, Config(seed_file=[str(repo / p) for p in SEED_FILES]))
    return buffers


def run_cell(policy, tokenizer, sb: Sandbox, cell: str, samples: int, max_new_tokens: int, k: int, seed: int,
             induction_inputs: int, task_types: list[str]) -> dict:
    template, temperature, top_p, source, *style = cell.split(":")
    rng = random.Random(seed)
    buffers = reference_buffers(source, sb)
    pool = [t for tt in ("deduction", "abduction") for t in buffers[tt].tasks]
    jobs = []
    for i in range(samples):
        task_type = task_types[i % len(task_types)]
        program = rng.choice(pool)
        jobs.append((task_type, program, propose_prompt(task_type, buffers[task_type].sample_references(k, rng),
                                                        program=program, num_inputs=induction_inputs,
                                                        style=style[0] if style else "official")))
    t0 = time.perf_counter()
    out = generate(policy, tokenizer, [render(tokenizer, text, template) for _, _, text in jobs], max_new_tokens,
                   temperature=float(temperature), top_p=float(top_p), batch_size=samples, desc=cell)
    seconds = time.perf_counter() - t0
    rows = {}
    for task_type in task_types:
        mine = [(program, g) for (t, program, _), g in zip(jobs, out) if t == task_type]
        proposals = [parse_proposal(task_type, RESPONSE_PREFIX + g.text, program=program.program)
                     for program, g in mine]
        results = validate_proposals(sb, task_type, proposals, 1, num_shown=induction_inputs // 2,
                                      existing=buffers[task_type])
        rows[task_type] = {
            "n": len(mine), "valid": sum(r.valid for r in results),
            "well_formatted": sum(p.well_formatted for p in proposals),
            "valid_and_formatted": sum(r.valid and p.well_formatted for r, p in zip(results, proposals)),
            "cap_hits": sum(g.truncated for _, g in mine),
            "failures": Counter(reason_kind(r.reason) for r in results if not r.valid).most_common(),
            "samples": [{"program": program.program, "response": g.text, "valid": r.valid, "reason": r.reason,
                         "well_formatted": p.well_formatted}
                        for (program, g), r, p in zip(mine, results, proposals)],
        }
    tokens = sum(len(g.response_ids) for g in out)
    return {"cell": cell, "seconds": round(seconds, 1), "tokens": tokens,
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1), "types": rows}


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
