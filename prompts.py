"""Prompts and answer parsing for the Absolute Zero Reasoner (six templates: propose/solve x
deduction/abduction/induction).

Proposer prompts reword the official AZR prompts; solver prompts end in a literal answer skeleton. The template
(`render`: the plain R1 conversation or the tokenizer's chat template) asks for
`<think>reasoning</think><answer>fenced blocks</answer>` and starts each response after "<think>".

Extraction order (after AZR's code):
1. the region inside the LAST `<answer>` ... `</answer>` (an unclosed last `<answer>` runs to the end of the text);
2. inside it, the LAST fenced block whose language tag matches exactly (```python / ```py for programs,
   ```input, ```output, ```message); an ```input block is never taken as a program;
3. fallback: the same search over the whole text (then the answer is not `well_formatted`);
4. lenient mode only (--lenient-answers warm-up): an untagged ``` block, an unclosed trailing block, or the bare
   answer region / text, with no format penalty (`well_formatted` is True).
`well_formatted` = AZR's check (`tags_ok`: the response, with its "<think>" prefix, starts
`<think>...</think> <answer>...</answer>`) and the block was found inside the answer. Parsers take the response
with its prefix, and never raise: failures come back as `error`.
AZR's entry-point rule: a program without `f` whose only top-level function has another name gets that function
renamed to `f` (`rename_entry`; applied to proposals here, and to induction answers when they are checked).

Each task type's one definition (rewards.TaskType) names the prompt builders and parsers it uses from here;
rewards dispatches on the task type's name (propose_prompt, solve_prompt, parse_proposal, parse_answer).
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

# Proposer prompts follow the official AZR wording (reworded): code, input and formatting requirements, an example
# of the two blocks, the evaluation criteria and a short list of banned words, then the reference snippets. They ask
# for blocks, not tags: the tags come from the template (TEMPLATES below). The sandbox keeps its full screen.
BANNED_WORDS = ("logging", "random", "multiprocessing", "pebble", "subprocess", "threading", "datetime", "time",
                "hashlib", "hmac", "bcrypt", "os.sys", "os.path", "sys.exit", "os.environ", "calendar")

_PROGRAM_RULES = """### Code Requirements:
- Name the entry function `f` (e.g. `def f(...): ...`); nested definitions inside `f` are fine
- `f` returns a value and takes at least one argument
- `f` is deterministic
- The snippet needs state tracking over several data transformations, so that solving it takes many reasoning steps
- Do NOT use: random functions or values, dates or times, I/O (files, network), printing or logging, external state
- It finishes within 10 seconds on a modern CPU
- Imports and class definitions go at the very top of the snippet
- The snippet ends with the return of `f`; anything after it is removed"""

_INPUT_RULES = """### Input Requirements:
- Give exactly one test input for your function
- Separate several arguments with commas
- Put quotes around string arguments"""

_PROPOSE_IO = ("## Task: Create a Python Code Snippet (custom classes allowed, defined at the top) "
               """with one Matching Input

Using the reference snippets below as examples, design a new and unique Python code snippet that takes deep
algorithmic reasoning to {goal}. Submit a code snippet and one test input; the input is plugged into the snippet to
produce the output. {subject} This is an I.Q. test.

{program_rules}

{input_rules}

### Formatting:
- Put your code in:
```python
def f(...):
    # your code here
    return ...
```
- Put your input in:
```input
arg1, arg2, ...
```

### Example Format:
```python
def f(name: str, info: dict):
    # code logic here
    return result
```

```input
'John', {{'age': 20, 'city': 'New York'}}
```

### Evaluation Criteria:
- Executability: your code runs on your input
- Difficulty of {difficulty}. Aim for algorithmic reasoning or complex logic: data structures (trees, heaps, stacks,
queues, graphs), control flow, dynamic programming, recursion, divide and conquer, greedy, backtracking
- Creativity: the code is clearly different from the reference snippets
- Restricted words: do not use any of these, in any form, even in comments: {banned}

First make a plan: how your snippet will be challenging, different from the references, and creative. Then write
the final code snippet and its input.

### Reference Code Snippets:
{references}
""")

_GOALS = {
    "deduction": dict(goal="deduce the output from the input",
                      subject="The input is given to a test subject, who must deduce the output.",
                      difficulty="predicting the output from your ```input``` and ```python``` code"),
    "abduction": dict(goal="deduce one possible input from a given output",
                      subject="The output is given to a test subject, who must find any input that produces it.",
                      difficulty="finding your ```input``` from your ```python``` code and the ```output``` it "
                                 "deterministically produces"),
}

_PROPOSE_INDUCTION = ("## Task: Write {n} Inputs for the Code Snippet below that produce diverse Outputs, "
                      """and a Message about it

Using the code snippet below, design {n} inputs that produce a diverse set of outputs. Some of your inputs and their
outputs are given to a test subject, who must deduce the code snippet from them: this is an I.Q. test. You may also
leave the test subject a message that helps them.

### Input Requirements:
- Give {n} valid inputs for the code snippet
- Separate several arguments with commas
- Put quotes around string arguments
- Wrap each input in its own ```input block

### Message Requirements:
- Leave the test subject a message, wrapped in a ```message block
- It may take any form: a coding question, or a plain description of what the snippet does
- It must not contain the code snippet

### Formatting:
- Put each input in:
```input
arg1, arg2, ...
```

### Example Format:
```input
'John', {{'age': 20, 'city': 'New York'}}
```
```input
'Sammy', {{'age': 37, 'city': 'Los Angeles'}}
```

### Evaluation Criteria:
- Executability: the code runs on every input
- Coverage: the inputs and outputs cover the snippet's input space, enough to deduce the snippet
- Creativity: the inputs are clearly different from each other
- Inputs and message together are challenging for the test subject, but not impossible
First make a plan: understand the code snippet, then say how your inputs cover it and why they are challenging and
creative. Then write the inputs, each in ```input blocks, and the message in a ```message block.

### Code Snippet:
```python
{program}
f(<|YOUR INPUT WILL BE PLUGGED HERE|>)
```
""")

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


def render_reference(task: Task, index: int = 0) -> str:
    """One reference snippet: its program, input and output blocks (an induction task shows its first pair)."""
    if task.inputs:
        inp, out = task.inputs[0], (task.outputs[0] if task.outputs else "")
    else:
        inp, out = task.input, task.output
    body = "\n".join([_fence("python", task.program), _fence("input", inp), _fence("output", out)])
    return f"<snippet_{index}>\n{body}\n</snippet_{index}>"


def propose_io_prompt(task_type: str, references: list[Task], banned_words: Sequence[str] = BANNED_WORDS,
                      program: Task | None = None, num_inputs: int = 10) -> str:
    refs = "\n".join(render_reference(t, i) for i, t in enumerate(references)) or "(none)"
    return _PROPOSE_IO.format(**_GOALS[task_type], program_rules=_PROGRAM_RULES, input_rules=_INPUT_RULES,
                              banned=", ".join(banned_words) or "(none)", references=refs)


def induction_program(references: list[Task], program: Task | None) -> Task:
    """The task whose program an induction proposer writes inputs for: `program`, else the first reference."""
    if program is None:
        if not references:
            raise ValueError("induction proposal needs a program (or at least one reference task)")
        program = references[0]
    return program


def propose_induction_prompt(task_type: str, references: list[Task], banned_words: Sequence[str] = BANNED_WORDS,
                             program: Task | None = None, num_inputs: int = 10) -> str:
    program = induction_program(references, program)
    return _PROPOSE_INDUCTION.format(n=num_inputs, program=program.program.strip())


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
_WELL = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
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
    """AZR's format check on the response with its prefix: it starts `<think> ... </think> <answer> ... </answer>`."""
    return _WELL.match(text) is not None


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
    """AZR's "nothing after f runs": drop top-level bare expressions (print(f(..)), asserts), `if __name__ ==
    '__main__'` blocks, and every statement after the entry function that defines nothing (test calls such as
    `result = f(x)`). The entry function is `f`, else the last top-level function. Unparseable programs are
    returned unchanged (validation rejects them)."""
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return program.strip("\n")
    functions = [i for i, n in enumerate(tree.body) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    entry = next((i for i in functions if tree.body[i].name == "f"), functions[-1] if functions else len(tree.body))
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)
    keep, changed = [], False
    for i, node in enumerate(tree.body):
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and i == 0
        is_main = (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                   and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")
        if ((isinstance(node, (ast.Expr, ast.Assert)) and not is_docstring) or is_main
                or (i > entry and not isinstance(node, definitions))):
            changed = True
            continue
        keep.append(node)
    if not changed:
        return program.strip("\n")
    try:
        return ast.unparse(ast.Module(body=keep, type_ignores=[]))
    except Exception:
        return program.strip("\n")


def rename_entry(program: str) -> str:
    """AZR's entry-point rule: if no top-level `f` exists and exactly one top-level function does, rename it (and
    its recursive calls) to `f`. Anything else is returned unchanged."""
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return program
    defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | set(defs)
    if "f" in names or len(defs) != 1:
        return program
    return re.sub(rf"(?<![\w.]){re.escape(defs[0])}\b", "f", program)


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
        prog = rename_entry(clean_program(prog))
        if inp is None or not inp.strip():
            return Proposal(program=prog, error="no ```input block")
        return Proposal(program=prog, input=inp.strip(), well_formatted=well)
    except Exception as e:  # never raise
        return Proposal(error=f"parse error: {type(e).__name__}")


def split_input_lines(block: str) -> list[str]:
    """The inputs in one ```input block: one per line when there are several lines and each alone is the arguments
    of a call (none ending in a comma), as small models write them; otherwise the whole block is one input.
    A deviation from the official parser, which takes each block as one input."""
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    if len(lines) < 2:
        return lines
    for line in lines:
        try:
            ast.parse(f"f({line}\n)", mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return [block.strip()]
        if line.endswith(","):
            return [block.strip()]
    return lines


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
        inputs = [line for block in inputs for line in split_input_lines(block)]
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


def answer_parser(kind: str) -> Callable[[str, bool], Answer]:
    """The never-raising answer parser for one block kind ("output", "input", "program"): (text, lenient)."""
    def parse(text: str, lenient: bool = False) -> Answer:
        try:
            return _parse_answer(kind, text, lenient)
        except Exception as e:  # never raise
            return Answer(well_formatted=lenient, error=f"parse error: {type(e).__name__}")
    return parse


# The compact proposer prompts (--proposer-prompt compact): a few lines of rules, the references, and the answer form
# filled in with the first reference (induction: with an example call of the program, so inputs have the right
# shape). A deviation for small models, measured in bench/bench_proposals.py (README).
_COMPACT_IO = """## Task: Write a new Python function `f` and one input for it

{subject}
Write a new function, clearly different from the reference programs below, that takes several reasoning steps
to {goal}: use loops, conditions, strings, lists or dicts.

Rules:
- the function is named `f`, takes at least one argument and returns a value
- it is deterministic: no randomness, dates, times, printing, files or network
- the input is the arguments of one call to `f`, written as Python literals and separated by commas

Reference programs:
{references}

Reply in exactly this form ({form_note}):
<think>
A plan in one or two sentences.
</think>
<answer>
```python
{form_program}
```
```input
{form_input}
```
</answer>"""

_COMPACT_GOALS = {
    "deduction": dict(subject="A test subject will see your function and your input, and must predict the output.",
                      goal="predict its output"),
    "abduction": dict(subject="A test subject will see your function and its output on your input, and must find "
                              "an input that gives that output.", goal="find an input from its output"),
}

_COMPACT_INDUCTION = """## Task: Write {n} inputs for the Python function below, and a message

A test subject will see some of your inputs with the outputs `f` returns for them, and must write `f`. Give {n}
different inputs that together show what `f` does, and a message with a hint about `f` that does not contain
its code.

```python
{program}
```
An input is the arguments of one call to `f`, written as Python literals and separated by commas. For example,
`f` was called with:
```input
{example}
```

Reply in exactly this form, with your {n} inputs one per line:
<think>
A plan in one or two sentences.
</think>
<answer>
```input
{lines}
```
```message
your hint
```
</answer>"""


def compact_io_prompt(task_type: str, references: list[Task], banned_words: Sequence[str] = BANNED_WORDS,
                      program: Task | None = None, num_inputs: int = 10) -> str:
    """Compact deduction/abduction proposer prompt; the form is filled in with the first reference, so nothing in
    it can be copied except as a duplicate."""
    refs = "\n".join(render_reference(t, i) for i, t in enumerate(references)) or "(none)"
    if references:
        form = dict(form_note="shown filled in with snippet_0; yours must be a new function and input",
                    form_program=references[0].program.strip(), form_input=references[0].input.strip())
    else:
        form = dict(form_note="with your own function and input", form_program="def f(...):\n    ...",
                    form_input="the arguments of one call")
    return _COMPACT_IO.format(**_COMPACT_GOALS[task_type], references=refs, **form)


def compact_induction_prompt(task_type: str, references: list[Task], banned_words: Sequence[str] = BANNED_WORDS,
                             program: Task | None = None, num_inputs: int = 10) -> str:
    """Compact induction proposer prompt: the program, an example call of it, one placeholder line per input."""
    program = induction_program(references, program)
    example = program.inputs[0] if program.inputs else program.input
    lines = "\n".join(f"your input {i + 1}" for i in range(num_inputs))
    return _COMPACT_INDUCTION.format(n=num_inputs, program=program.program.strip(), example=example.strip(),
                                     lines=lines)


PROPOSER_PROMPTS = ("official", "compact")   # --proposer-prompt: see rewards.propose_prompt


# Templates. Both ask for `<think> reasoning </think> <answer> answer </answer>` and start every response (both
# roles) inside the reasoning, after "<think>", as AZR does. `r1` is the plain-text R1-Zero conversation AZR trains
# with; `chat` puts the same instruction in the system message of the tokenizer's chat template.
TEMPLATES = ("r1", "chat")
DEFAULT_TEMPLATE = "r1"
R1_INSTRUCTION = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
                  "The assistant first thinks about the reasoning process in the mind and then provides the user "
                  "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
                  "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
                  "<answer> answer here </answer>.")
RESPONSE_PREFIX = "<think>\n"


def render(tokenizer, prompt: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The full prompt text the model continues: the task wrapped in `template`, ending in RESPONSE_PREFIX.
    A tokenizer without a chat template gets the r1 text."""
    if template == "chat" and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": R1_INSTRUCTION}, {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + RESPONSE_PREFIX
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    return f"{R1_INSTRUCTION} User: {prompt}\nAssistant: {RESPONSE_PREFIX}"
