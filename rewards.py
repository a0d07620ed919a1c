"""Task types, rewards, proposal validation and answer checking for the Absolute Zero Reasoner.

Rewards (paper arXiv 2505.03335, Eqs. 4-5, as the official code computes them):
- proposer_reward(r) = 1 - r for a valid, well-formatted task with solver success rate r in (0, 1);
  `extreme_reward` when r is 0 or 1 (official code -0.5, the default here; the paper's Eq. 4 says 0).
  An invalid or badly formatted proposal gets INVALID_PROPOSAL_REWARD (-1). r counts correct answers whatever
  their format.
- solver_reward: 1 correct, -0.5 wrong but well formatted, -1 format error (a format error is -1 even if the
  extracted text happens to be right).

validate_proposals returns a ValidationResult per proposal: (task, reason, hard, force_accepted); `task` is None
when rejected. Admission follows the official code: every proposal that passes the hard checks is valid and its
task enters the buffer; the response's format only decides the proposer reward.
Hard checks (always reject): parse failure (no program / no input), static screen (check_program),
  does not run or is not deterministic (sandbox with repeats=2: two processes), induction with fewer than
  num_shown + 1 usable inputs.
Duplicates of a task in `existing` or earlier in the batch stay valid (reason "duplicate"); the buffer skips them.
Soft checks (`strict=True` only, off by default): trivial task (deduction/abduction: output equals the input;
  induction: all outputs equal; induction without a message), output not a plain literal (Result.literal).
  Their reason is reported either way. With strict and force_accept a task that fails only soft checks is
  accepted with force_accepted=True.
Induction rule: proposed inputs are run in order (repeats=2); an input is usable when it ran ok and its normalised
  text (ast.dump of the call's arguments) differs from every earlier usable input. The first num_shown usable
  inputs are shown to the solver and up to num_shown more are held out (the paper's 5 + 5 when all 10 are
  usable; later ones are dropped); at least one must be held out, so num_shown + 1 usable inputs are needed.
Correctness (check_answers, sandbox runs with repeats=2): deduction compares the predicted literal text with the
  gold output via same_output (never executed); abduction runs the task program on the predicted input, which must
  be a literal argument list (an expression would be solver-written code, and the prompt shows the gold output),
  and compares with the gold output; induction runs the predicted program on every held-out input and is correct
  only if ALL outputs match. Outputs are compared with sandbox.output_matches: a genuine literal, same_output.

Task types: each one is a single TaskType definition (DEDUCTION, ABDUCTION, INDUCTION below) that names its
proposer prompts (official, compact), solver prompt, proposal and answer parsers (parts from
prompts.py), its sandbox rules (how a proposal becomes a task, how an answer is judged) and the seed task its buffer
starts from. Every dispatcher reads the one registry, TASK_TYPES: propose_prompt, solve_prompt, parse_proposal,
parse_answer, seed_task, validate_proposals, check_answers. A new task type is one TaskType passed to
register_task_type (examples/custom_task_type.py).
"""
from __future__ import annotations

import ast
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import prompts
from buffers import Task, TaskBuffer, normalize_input
from prompts import BANNED_WORDS, PROPOSER_PROMPTS, Answer, Proposal, rename_entry
from sandbox import check_program, output_matches, same_output

INVALID_PROPOSAL_REWARD = -1.0


# ----------------------------------------------------------------------------- rewards

def proposer_reward(success_rate: float, extreme_reward: float = -0.5) -> float:
    """Learnability reward 1 - r; `extreme_reward` when r is 0 or 1 (official code -0.5, paper 0.0)."""
    if success_rate <= 0.0 or success_rate >= 1.0:
        return float(extreme_reward)
    return 1.0 - float(success_rate)


def solver_reward(correct: bool, well_formatted: bool) -> float:
    """1 correct; -0.5 wrong but well formatted; -1 format error."""
    if not well_formatted:
        return -1.0
    return 1.0 if correct else -0.5


# ----------------------------------------------------------------------------- helpers

def literal_args(text: str) -> bool:
    """True if `text` is an argument list of plain literals (positional or keyword), e.g. "'a', [1, 2], k=3"."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
            return False
        for node in list(call.args) + [k.value for k in call.keywords]:
            if isinstance(node, ast.Starred):
                return False
            ast.literal_eval(node)
        return all(k.arg is not None for k in call.keywords)
    except Exception:
        return False


# ----------------------------------------------------------------------------- the built-in task types' rules

def _io_jobs(p: Proposal) -> list[tuple[str, str]]:
    return [(p.program, p.input)]


def _io_builder(task_type: str):
    def build(p: Proposal, results: list, iteration: int, num_shown: int) -> Task | str:
        res = results[0]
        if not res.ok or res.output is None:
            return f"does not execute deterministically: {res.error}"
        return Task(task_type, p.program, input=p.input, output=res.output, iteration=iteration)
    return build


def _io_soft(task: Task, p: Proposal, results: list) -> str | None:
    if not results[0].literal:
        return "output is not a plain literal"
    if same_output(task.output, task.input) or same_output(task.output, f"({task.input},)"):
        return "trivial: output equals input"
    return None


def _induction_jobs(p: Proposal) -> list[tuple[str, str]]:
    return [(p.program, i) for i in p.inputs]


def _induction_build(p: Proposal, results: list, iteration: int, num_shown: int) -> Task | str:
    inputs, outputs, seen = [], [], set()
    for inp, res in zip(p.inputs, results):
        key = normalize_input(inp)
        if res.ok and res.output is not None and key not in seen and len(inputs) < 2 * num_shown:
            seen.add(key)
            inputs.append(inp)
            outputs.append(res.output)
    if len(inputs) < num_shown + 1:
        errors = [r.error for r in results if not r.ok]
        return (f"only {len(inputs)} usable distinct inputs, need {num_shown + 1}"
                + (f" (e.g. {errors[0]})" if errors else ""))
    return Task("induction", p.program, inputs=inputs, outputs=outputs, message=p.message, iteration=iteration)


def _induction_soft(task: Task, p: Proposal, results: list) -> str | None:
    if not all(r.literal for r in results if r.ok):
        return "output is not a plain literal"
    if all(same_output(o, task.outputs[0]) for o in task.outputs[1:]):
        return "trivial: all outputs equal"
    if not task.message.strip():
        return "no message"
    return None


def _deduction_answer_jobs(task: Task, a: Answer, num_shown: int) -> list[tuple[str, str]]:
    return []  # the predicted output is compared, never executed


def _deduction_judge(task: Task, a: Answer, results: list, num_shown: int) -> bool:
    return bool(a.text.strip()) and same_output(a.text.strip(), task.output)


def _abduction_answer_jobs(task: Task, a: Answer, num_shown: int) -> list[tuple[str, str]]:
    # only literal argument lists run: an input expression would be solver-written code, and code that escaped
    # the static screen could forge its own result line with the gold output, which the prompt shows
    return [(task.program, a.text.strip())] if literal_args(a.text) else []


def _abduction_judge(task: Task, a: Answer, results: list, num_shown: int) -> bool:
    return bool(results) and output_matches(results[0], task.output)


def _induction_answer_jobs(task: Task, a: Answer, num_shown: int) -> list[tuple[str, str]]:
    held = task.inputs[num_shown:]
    if not a.text.strip() or not held:
        return []
    return [(rename_entry(a.text), i) for i in held]      # AZR's rule: a lone function other than f becomes f


def _induction_judge(task: Task, a: Answer, results: list, num_shown: int) -> bool:
    gold = task.outputs[num_shown:]
    if not results or len(results) != len(gold):
        return False
    return all(output_matches(r, g) for r, g in zip(results, gold))


# ----------------------------------------------------------------------------- task types

@dataclass(frozen=True, kw_only=True)
class TaskType:
    """Everything about one task type; dispatchers look it up by `name` in TASK_TYPES."""
    name: str
    # proposer prompts: (task_type, references, banned_words, program, num_inputs) -> text
    propose: Callable[..., str]                    # the official prompt (--proposer-prompt official)
    compact: Callable[..., str] | None = None      # compact prompt (compact); None = the official one
    solve: Callable[[Task, int], str]              # (task, num_shown) -> solver prompt
    parse_proposal: Callable[..., Proposal]        # (task_type, text, program) -> Proposal; never raises
    parse_answer: Callable[[str, bool], Answer]    # (text, lenient) -> Answer; never raises
    proposal_jobs: Callable[[Proposal], list[tuple[str, str]]]         # sandbox jobs that validate a proposal
    build_task: Callable[[Proposal, list, int, int], Task | str]       # (proposal, results, iteration, num_shown)
    soft_check: Callable[[Task, Proposal, list], str | None]           # (task, proposal, results) -> soft failure
    answer_jobs: Callable[[Task, Answer, int], list[tuple[str, str]]]  # sandbox jobs that check an answer
    judge: Callable[[Task, Answer, list, int], bool]                   # (task, answer, results, num_shown)
    seed: Callable[[], Task]                       # the task its buffer starts from


# seeds: the paper's identity triplet `def f(a): return a` on 'Hello world'
IDENTITY_PROGRAM = "def f(a):\n    return a"
_SEED_INDUCTION_INPUTS = ["'Hello world'", "1", "[1, 2, 3]", "{'a': 1}", "(4, 'b')",
                          "''", "-2.5", "True", "None", "[[0], 'x']"]

DEDUCTION = TaskType(
    name="deduction",
    propose=prompts.propose_io_prompt, compact=prompts.compact_io_prompt,
    solve=prompts.solve_deduction_prompt,
    parse_proposal=prompts.parse_io_proposal, parse_answer=prompts.answer_parser("output"),
    proposal_jobs=_io_jobs, build_task=_io_builder("deduction"), soft_check=_io_soft,
    answer_jobs=_deduction_answer_jobs, judge=_deduction_judge,
    seed=lambda: Task("deduction", IDENTITY_PROGRAM, "'Hello world'", "'Hello world'"))
ABDUCTION = TaskType(
    name="abduction",
    propose=prompts.propose_io_prompt, compact=prompts.compact_io_prompt,
    solve=prompts.solve_abduction_prompt,
    parse_proposal=prompts.parse_io_proposal, parse_answer=prompts.answer_parser("input"),
    proposal_jobs=_io_jobs, build_task=_io_builder("abduction"), soft_check=_io_soft,
    answer_jobs=_abduction_answer_jobs, judge=_abduction_judge,
    seed=lambda: Task("abduction", IDENTITY_PROGRAM, "'Hello world'", "'Hello world'"))
INDUCTION = TaskType(
    name="induction",
    propose=prompts.propose_induction_prompt, compact=prompts.compact_induction_prompt,
    solve=prompts.solve_induction_prompt,
    parse_proposal=prompts.parse_induction_proposal, parse_answer=prompts.answer_parser("program"),
    proposal_jobs=_induction_jobs, build_task=_induction_build, soft_check=_induction_soft,
    answer_jobs=_induction_answer_jobs, judge=_induction_judge,
    seed=lambda: Task("induction", IDENTITY_PROGRAM, inputs=list(_SEED_INDUCTION_INPUTS),
                      outputs=list(_SEED_INDUCTION_INPUTS), message="Return the argument unchanged."))

TASK_TYPES: dict[str, TaskType] = {t.name: t for t in (DEDUCTION, ABDUCTION, INDUCTION)}
BUILTIN_TASK_TYPES = tuple(TASK_TYPES)     # the paper's three, the default --task-types


def register_task_type(task_type: TaskType) -> None:
    """Add (or replace) a task type; then `--task-types ... <its name>`."""
    TASK_TYPES[task_type.name] = task_type


def propose_prompt(task_type: str, references: list[Task], banned_words: Sequence[str] = BANNED_WORDS,
                   program: Task | None = None, num_inputs: int = 10, style: str = "official") -> str:
    """Proposer prompt; induction uses `program` (a buffer task whose program gets new inputs). `style`: "official"
    (the official wording) or "compact" (its compact prompt; a task type without one gets the official prompt)."""
    if style not in PROPOSER_PROMPTS:
        raise ValueError(f"unknown proposer prompt {style!r}; choose from {', '.join(PROPOSER_PROMPTS)}")
    definition = TASK_TYPES[task_type]
    if style == "compact" and definition.compact is not None:
        return definition.compact(task_type, references, banned_words, program, num_inputs)
    return definition.propose(task_type, references, banned_words, program, num_inputs)


def solve_prompt(task: Task, num_shown: int = 5) -> str:
    return TASK_TYPES[task.task_type].solve(task, num_shown)


def parse_proposal(task_type: str, text: str, program: str = "") -> Proposal:
    """Never raises. `program`: for induction, the buffer program the prompt showed (copied into the Proposal)."""
    if not isinstance(text, str):
        return Proposal(program=program, error="not a string")
    if not isinstance(task_type, str) or task_type not in TASK_TYPES:
        return Proposal(program=program, error=f"unknown task type {task_type!r}")
    return TASK_TYPES[task_type].parse_proposal(task_type, text, program)


def parse_answer(task_type: str, text: str, lenient: bool = False) -> Answer:
    """Never raises; lenient (--lenient-answers): tags optional, bare text accepted, no format penalty."""
    if not isinstance(text, str):
        return Answer(well_formatted=lenient, error="not a string")
    if not isinstance(task_type, str) or task_type not in TASK_TYPES:
        return Answer(error=f"unknown task type {task_type!r}")
    return TASK_TYPES[task_type].parse_answer(text, lenient)


def seed_task(task_type: str) -> Task:
    """The seed task of a task type (the identity triplet for the built-in ones)."""
    return TASK_TYPES[task_type].seed()


# ----------------------------------------------------------------------------- validation and checking

@dataclass
class ValidationResult:
    task: Task | None            # the validated task, None if rejected
    reason: str | None = None    # why it failed a check (hard or soft); None if it passed all
    hard: bool = False           # the failure was a hard one (never accepted)
    force_accepted: bool = False  # accepted only because force_accept was on

    @property
    def valid(self) -> bool:
        return self.task is not None


def validate_proposals(sb, task_type: str, proposals: list[Proposal], iteration: int, num_shown: int = 5, *,
                       existing: Iterable[Task] | TaskBuffer = (), strict: bool = False,
                       force_accept: bool = False) -> list[ValidationResult]:
    """Turn proposals into tasks with ONE sb.run_many(..., repeats=2) batch; see the module docstring."""
    definition = TASK_TYPES[task_type]
    out: list[ValidationResult | None] = [None] * len(proposals)
    spans: list[tuple[int, int, int]] = []   # (proposal index, start, end) into jobs
    jobs: list[tuple[str, str]] = []
    for i, p in enumerate(proposals):
        bad = p.error or ("no program" if not p.program.strip() else check_program(p.program, sb.forbidden_modules))
        if bad:
            out[i] = ValidationResult(None, bad, hard=True)
            continue
        js = definition.proposal_jobs(p)
        spans.append((i, len(jobs), len(jobs) + len(js)))
        jobs += js
    results = sb.run_many(jobs, repeats=2) if jobs else []
    seen = set(existing._keys) if isinstance(existing, TaskBuffer) else {t.key() for t in existing}
    for i, a, b in spans:
        p, res = proposals[i], results[a:b]
        task = definition.build_task(p, res, iteration, num_shown)
        if isinstance(task, str):
            out[i] = ValidationResult(None, task, hard=True)
            continue
        soft = "duplicate" if task.key() in seen else definition.soft_check(task, p, res)
        seen.add(task.key())
        if soft is None or soft == "duplicate" or not strict:
            out[i] = ValidationResult(task, soft)
        elif force_accept:
            out[i] = ValidationResult(task, soft, force_accepted=True)
        else:
            out[i] = ValidationResult(None, soft)
    return out  # type: ignore[return-value]


def check_answers(sb, tasks: list[Task], answers: list[Answer], num_shown: int = 5) -> list[bool]:
    """Correctness of each answer for its task, with ONE sb.run_many batch (repeats=2: a result that differs
    between two processes never counts, so a coin-flip program cannot earn a solve rate of about 1/2)."""
    if len(tasks) != len(answers):
        raise ValueError("tasks and answers differ in length")
    spans, jobs = [], []
    for t, a in zip(tasks, answers):
        js = TASK_TYPES[t.task_type].answer_jobs(t, a, num_shown) if a.text.strip() else []
        # solver-written programs (induction) get the static screen before they run
        if any(prog != t.program and check_program(prog, sb.forbidden_modules) for prog, _ in js):
            spans.append(None)
            continue
        spans.append((len(jobs), len(jobs) + len(js)))
        jobs += js
    results = sb.run_many(jobs, repeats=2) if jobs else []
    out = []
    for t, a, span in zip(tasks, answers, spans):
        if span is None or not a.text.strip():
            out.append(False)
            continue
        out.append(bool(TASK_TYPES[t.task_type].judge(t, a, results[span[0]:span[1]], num_shown)))
    return out
