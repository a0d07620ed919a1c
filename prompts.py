"""Prompts and answer parsing for the Absolute Zero Reasoner (six templates: propose/solve x deduction/abduction/induction).

Templates are compact rewordings of the paper's appendix prompts (arXiv 2505.03335, Figs. "Program Input
Abduction/Output Deduction/Induction Task" for proposer and solver). Every response is asked to be
`<think>reasoning</think><answer>fenced blocks</answer>`.

Extraction order (after AZR's code):
1. the region inside the LAST `<answer>` ... `</answer>` (an unclosed last `<answer>` runs to the end of the text);
2. inside it, the LAST fenced block whose language tag matches exactly (```python / ```py for programs,
   ```input, ```output, ```message); an ```input block is never taken as a program;
3. fallback: the same search over the whole text (then the answer is not `well_formatted`);
4. lenient mode only (force-accept warm-up): an untagged ``` block, an unclosed trailing block, or the bare
   answer region / text, with no format penalty (`well_formatted` is True).
`well_formatted` (strict) = at most one `<think>` before exactly one `</think>`, followed by exactly one
`<answer>...</answer>` pair with nothing but whitespace after it, and the block found inside the answer.
Parsers never raise: failures come back as `error`.

Per task type dispatch goes through the registries PROPOSE_PROMPTS, SOLVE_PROMPTS, PROPOSAL_PARSERS,
ANSWER_PARSERS (see `register_task_type`).
"""
from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from buffers import Task


@dataclass
class Proposal:
    program: str = ""
    input: str = ""
    inputs: list[str] = field(default_factory=list)
    message: str = ""
    error: str | None = None       # None if the needed parts were found
    well_formatted: bool = False   # think/answer tags present and the blocks were inside <answer>


@dataclass
class Answer:
    text: str = ""                 # deduction: output literal; abduction: input arguments; induction: program
    well_formatted: bool = False
    error: str | None = None


# ----------------------------------------------------------------------------- templates

# The solver templates end with a literal answer skeleton. The proposer templates show the blocks with a stub
# program and ask for the tags in one line (FORMAT, also used by examples/custom_task_type.py):
# with a complete example program in a skeleton, the 0.5B default model mostly explained that example instead
# (probe on 8 samples per template: 2/24 valid proposals against 7/24 with these).
FORMAT = ("Think first, then answer, exactly as: <think> your reasoning </think> "
          "<answer> your fenced blocks </answer>")

_CODE_RULES = """Rules for the program:
- entry function `f` with at least one argument; it must return a value; nested definitions are fine
- deterministic: no randomness, time, I/O, printing, or external state; finishes within a few seconds
- imports and helpers at the top; nothing after `f` runs
- do not use these modules: {banned}
The input is the argument list of one call f(<input>): commas between arguments, quotes around strings."""

_PROPOSE_IO = """## Task: Create a new Python program with one matching input
Design a new, unique program and an input so that {goal}. This is an I.Q. test for another model.
Reference tasks (do not copy them):
{references}
{rules}
Make it require several steps of state tracking to solve; be creative.
Give the program in a ```python block and the input in an ```input block, e.g.
```python
def f(name, info):
    return ...
```
```input
'John', {{'age': 20}}
```
{fmt}"""

_GOALS = {
    "deduction": "deducing the output from the program and input is hard",
    "abduction": "finding an input from the program and its output is hard",
}

_PROPOSE_INDUCTION = """## Task: Create inputs and a message for a Python program
Given the program below, write {n} diverse inputs that together let another model infer the program from
input/output pairs alone, and a short message that hints at what the program does without giving the code.
```python
{program}
```
Each input is the argument list of one call f(<input>): commas between arguments, quotes around strings.
Give each input in its own ```input block and the message in one ```message block, e.g.
```input
'abc', 2
```
```message
Combines a string and a count.
```
{fmt}"""

_SOLVE_DEDUCTION = """## Task: Deduce the output of a Python program for an input
```python
{program}
```
```input
{input}
```
What does f({input_short}) return? Trace the program step by step, then reply in exactly this form, with only
the return value, written as a Python literal (like 3, 'abc' or [1, 'x']), in the ```output block:
<think>
Your step-by-step trace.
</think>
<answer>
```output
the return value
```
</answer>"""

_SOLVE_ABDUCTION = """## Task: Find an input that makes a Python program return an output
```python
{program}
```
```output
{output}
```
Find any input that makes f return this output. Reply in exactly this form, with only the arguments of the
call f(...), written as Python literals (like 3, 'abc' or [1, 2], 'x'), in the ```input block:
<think>
Your reasoning backwards from the output.
</think>
<answer>
```input
the arguments
```
</answer>"""

_SOLVE_INDUCTION = """## Task: Infer a Python program from input/output pairs
Message: {message}
{pairs}
Write a function `f` that maps every input to its output (hidden test pairs are checked too). Reply in exactly
this form:
<think>
The pattern you see in the pairs.
</think>
<answer>
```python
def f(...):
    ...
```
</answer>"""


def _fence(lang: str, body: str) -> str:
    return f"```{lang}\n{body.strip()}\n```"


def render_reference(task: Task) -> str:
    if task.inputs:  # induction task used as reference: its first pair
        inp, out = task.inputs[0], (task.outputs[0] if task.outputs else "")
    else:
        inp, out = task.input, task.output
    return "\n".join([_fence("python", task.program), _fence("input", inp), _fence("output", out)])


def propose_io_prompt(task_type: str, references: list[Task], forbidden_modules: Sequence[str],
                      program: Task | None = None, num_inputs: int = 10) -> str:
    refs = "\n".join(f"### Reference {i + 1}\n{render_reference(t)}" for i, t in enumerate(references)) or "(none)"
    rules = _CODE_RULES.format(banned=", ".join(forbidden_modules) or "(none)")
    return _PROPOSE_IO.format(goal=_GOALS[task_type], references=refs, rules=rules, fmt=FORMAT)


def propose_induction_prompt(task_type: str, references: list[Task], forbidden_modules: Sequence[str],
                             program: Task | None = None, num_inputs: int = 10) -> str:
    if program is None:
        if not references:
            raise ValueError("induction proposal needs a program (or at least one reference task)")
        program = references[0]
    return _PROPOSE_INDUCTION.format(n=num_inputs, program=program.program.strip(), fmt=FORMAT)


def solve_deduction_prompt(task: Task, num_shown: int = 5) -> str:
    short = task.input.strip()
    short = short if len(short) <= 60 and "\n" not in short else "<input>"
    return _SOLVE_DEDUCTION.format(program=task.program.strip(), input=task.input.strip(), input_short=short)


def solve_abduction_prompt(task: Task, num_shown: int = 5) -> str:
    return _SOLVE_ABDUCTION.format(program=task.program.strip(), output=task.output.strip())


def solve_induction_prompt(task: Task, num_shown: int = 5) -> str:
    pairs = "\n".join(f"Input: f({i.strip()})\nOutput: {o.strip()}"
                      for i, o in zip(task.inputs[:num_shown], task.outputs[:num_shown]))
    return _SOLVE_INDUCTION.format(message=task.message.strip() or "(none)", pairs=pairs)


# ----------------------------------------------------------------------------- parsing

_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[ \t]*\r?\n(.*?)```", re.DOTALL)
_OPEN_TAIL = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[ \t]*\r?\n((?:(?!```).)*)\Z", re.DOTALL)
_WELL = re.compile(r"\s*(?:<think>)?(?:(?!<think>).)*</think>\s*<answer>(.*)</answer>\s*", re.DOTALL)
# Answers that may also stand bare inside <answer>...</answer> (AZR's own form for outputs and inputs).
BARE_ANSWER_KINDS = ("output", "input")
LANGS = {"program": ("python", "py", "python3"), "input": ("input",), "output": ("output",), "message": ("message",)}


def answer_region(text: str) -> str | None:
    """Content of the last <answer> (to its </answer>, or to the end if unclosed); None if there is no <answer>."""
    i = text.rfind("<answer>")
    if i < 0:
        return None
    rest = text[i + len("<answer>"):]
    j = rest.find("</answer>")
    return rest if j < 0 else rest[:j]


def tags_ok(text: str) -> bool:
    """Strict format: (<think>)? ... </think> <answer> ... </answer>, each tag exactly once."""
    if any(text.count(t) != 1 for t in ("</think>", "<answer>", "</answer>")) or text.count("<think>") > 1:
        return False
    return _WELL.fullmatch(text) is not None


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """All closed ```lang blocks as (lower-case language, body) in order."""
    return [(m.group(1).lower(), m.group(2)) for m in _BLOCK.finditer(text)]


def _last(blocks: list[tuple[str, str]], kind: str) -> str | None:
    found = [body for lang, body in blocks if lang in LANGS[kind]]
    return found[-1].strip("\n") if found else None


def _all(blocks: list[tuple[str, str]], kind: str) -> list[str]:
    return [body.strip() for lang, body in blocks if lang in LANGS[kind]]


def _regions(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str | None]:
    region = answer_region(text)
    return (fenced_blocks(region) if region is not None else []), fenced_blocks(text), region


def clean_program(program: str) -> str:
    """Drop top-level statements after AZR's "nothing after f runs": bare expressions (print(f(..)), asserts),
    `if __name__ == '__main__'` blocks. Unparseable programs are returned unchanged (validation rejects them)."""
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return program.strip("\n")
    keep, changed = [], False
    for node in tree.body:
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node is tree.body[0]
        is_main = (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                   and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")
        if (isinstance(node, (ast.Expr, ast.Assert)) and not is_docstring) or is_main:
            changed = True
            continue
        keep.append(node)
    if not changed:
        return program.strip("\n")
    try:
        return ast.unparse(ast.Module(body=keep, type_ignores=[]))
    except Exception:
        return program.strip("\n")


def parse_io_proposal(task_type: str, text: str, program: str = "") -> Proposal:
    """Deduction/abduction proposal: last ```python block (program) and last ```input block."""
    try:
        inner, whole, region = _regions(text)
        prog, inp = _last(inner, "program"), _last(inner, "input")
        well = tags_ok(text) and prog is not None and inp is not None
        if prog is None:
            prog = _last(whole, "program")
        if inp is None:
            inp = _last(whole, "input")
        if prog is None:
            return Proposal(error="no ```python block", input=(inp or "").strip())
        if inp is None or not inp.strip():
            return Proposal(program=clean_program(prog), error="no ```input block")
        return Proposal(program=clean_program(prog), input=inp.strip(), well_formatted=well)
    except Exception as e:  # never raise
        return Proposal(error=f"parse error: {type(e).__name__}")


def parse_induction_proposal(task_type: str, text: str, program: str = "") -> Proposal:
    """Induction proposal: every ```input block (in order) and the last ```message block; the program is the
    buffer program the prompt showed, passed through as `program`."""
    try:
        inner, whole, region = _regions(text)
        inputs, msg = _all(inner, "input"), _last(inner, "message")
        well = tags_ok(text) and bool(inputs)   # a missing message is a separate soft check
        if not inputs:
            inputs = _all(whole, "input")
        if msg is None:
            msg = _last(whole, "message")
        inputs = [i for i in inputs if i]
        err = None if inputs else "no ```input blocks"
        return Proposal(program=program, inputs=inputs, message=(msg or "").strip(), error=err, well_formatted=well)
    except Exception as e:
        return Proposal(program=program, error=f"parse error: {type(e).__name__}")


def _parse_answer(kind: str, text: str, lenient: bool) -> Answer:
    inner, whole, region = _regions(text)
    found = _last(inner, kind)
    if found is not None:
        return Answer(_tidy(kind, found), well_formatted=lenient or tags_ok(text))
    found = _last(whole, kind)
    if found is not None:
        return Answer(_tidy(kind, found), well_formatted=lenient)
    if kind in BARE_ANSWER_KINDS and region is not None and "```" not in region and region.strip():
        return Answer(region.strip(), well_formatted=lenient or tags_ok(text))   # AZR's <answer>literal</answer>
    if not lenient:
        return Answer(error=f"no ```{LANGS[kind][0]} block")
    # lenient fallbacks: untagged block, unclosed trailing block, bare text
    src = region if region is not None else text
    for scope in (src, text):
        untagged = [body for lang, body in fenced_blocks(scope) if lang in ("",) + LANGS[kind]]
        if untagged:
            return Answer(_tidy(kind, untagged[-1]), well_formatted=True)
        m = _OPEN_TAIL.search(scope)
        if m and m.group(1).lower() in ("",) + LANGS[kind]:
            return Answer(_tidy(kind, m.group(2)), well_formatted=True)
    bare = src.split("</think>")[-1]
    bare = _tidy(kind, re.sub(r"</?(?:think|answer)>", "", bare))
    return Answer(bare, well_formatted=True, error=None if bare else "empty answer")


def _tidy(kind: str, body: str) -> str:
    return clean_program(body).strip() if kind == "program" else body.strip()


def _answer_parser(kind: str) -> Callable[[str, bool], Answer]:
    def parse(text: str, lenient: bool = False) -> Answer:
        try:
            return _parse_answer(kind, text, lenient)
        except Exception as e:  # never raise
            return Answer(well_formatted=lenient, error=f"parse error: {type(e).__name__}")
    return parse


# ----------------------------------------------------------------------------- registries

PROPOSE_PROMPTS: dict[str, Callable[..., str]] = {
    "deduction": propose_io_prompt, "abduction": propose_io_prompt, "induction": propose_induction_prompt}
SOLVE_PROMPTS: dict[str, Callable[..., str]] = {
    "deduction": solve_deduction_prompt, "abduction": solve_abduction_prompt, "induction": solve_induction_prompt}
PROPOSAL_PARSERS: dict[str, Callable[..., Proposal]] = {
    "deduction": parse_io_proposal, "abduction": parse_io_proposal, "induction": parse_induction_proposal}
ANSWER_PARSERS: dict[str, Callable[[str, bool], Answer]] = {
    "deduction": _answer_parser("output"), "abduction": _answer_parser("input"), "induction": _answer_parser("program")}


def register_task_type(name: str, *, propose: Callable[..., str], solve: Callable[..., str],
                       parse_proposal: Callable[..., Proposal], parse_answer: Callable[[str, bool], Answer]) -> None:
    """Add a task type: propose(task_type, references, forbidden_modules, program, num_inputs) -> str,
    solve(task, num_shown) -> str, parse_proposal(task_type, text, program) -> Proposal (never raise),
    parse_answer(text, lenient) -> Answer (never raise)."""
    PROPOSE_PROMPTS[name], SOLVE_PROMPTS[name] = propose, solve
    PROPOSAL_PARSERS[name], ANSWER_PARSERS[name] = parse_proposal, parse_answer


def propose_prompt(task_type: str, references: list[Task], forbidden_modules: Sequence[str],
                   program: Task | None = None, num_inputs: int = 10) -> str:
    """Proposer prompt; induction uses `program` (a buffer task whose program gets new inputs)."""
    return PROPOSE_PROMPTS[task_type](task_type, references, forbidden_modules, program, num_inputs)


def solve_prompt(task: Task, num_shown: int = 5) -> str:
    return SOLVE_PROMPTS[task.task_type](task, num_shown)


def parse_proposal(task_type: str, text: str, program: str = "") -> Proposal:
    """Never raises. `program`: for induction, the buffer program the prompt showed (copied into the Proposal)."""
    if not isinstance(text, str):
        return Proposal(program=program, error="not a string")
    if not isinstance(task_type, str) or task_type not in PROPOSAL_PARSERS:
        return Proposal(program=program, error=f"unknown task type {task_type!r}")
    return PROPOSAL_PARSERS[task_type](task_type, text, program)


def parse_answer(task_type: str, text: str, lenient: bool = False) -> Answer:
    """Never raises; lenient = force-accept warm-up (tags optional, bare text accepted, no format penalty)."""
    if not isinstance(text, str):
        return Answer(well_formatted=lenient, error="not a string")
    if not isinstance(task_type, str) or task_type not in ANSWER_PARSERS:
        return Answer(error=f"unknown task type {task_type!r}")
    return ANSWER_PARSERS[task_type](text, lenient)


# A solver's response starts inside the reasoning, as in AZR's R1-style template ("Assistant: <think>"). Probe on
# the 0.5B default model, 8 samples per template: solver answers well formatted 3/24 with it against 0/24
# without; proposers with it wrote prose and no blocks (0/24 valid), so they get no prefix.
SOLVER_PREFIX = "<think>\n"
ROLE_PREFIX = {"propose": "", "solve": SOLVER_PREFIX}


def chat(tokenizer, prompt: str, prefix: str = "") -> str:
    """Render through the tokenizer's chat template (with generation prompt) if it has one, else the prompt as
    is; then `prefix`, the start of the response (SOLVER_PREFIX for solvers), which generation continues."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True)
        if isinstance(out, str):
            return out + prefix
    return prompt + prefix
