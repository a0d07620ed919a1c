"""A fourth reasoning mode without touching azr.py: output type prediction ("typeof").

Given a program and an input, the solver names the type of the value f returns (int, str, list, dict, ...);
the proposer writes (program, input) pairs whose result type is hard to foresee. The loop reads everything
type-specific from one definition per task type, so a new mode is one rewards.TaskType, written like the built-in
rewards.DEDUCTION, ABDUCTION and INDUCTION and passed to rewards.register_task_type: its proposer/solver prompts,
its proposal/answer parsers, how a proposal is validated in the sandbox and how an answer is judged, and the seed
task its buffer starts from. Then `--task-types deduction typeof` (any mix; TRR++ normalises each (task type,
role) group on its own).

    python examples/custom_task_type.py                     # deduction + typeof, cpu-demo sizes, default model
    python examples/custom_task_type.py --iterations 20     # any azr.py flag is passed through
"""
import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules
import azr  # noqa: E402
import buffers  # noqa: E402
import prompts  # noqa: E402
import rewards  # noqa: E402
from sandbox import same_output  # noqa: E402

NAME = "typeof"

PROPOSE = """## Task: Create a Python program and an input whose result type is hard to predict
Design a new program `f` and one input so that the type of f(<input>) (int, str, list, dict, ...) can only be
found by tracing the code carefully. Reference tasks (do not copy them; their output is the result type):
{references}
The program must be deterministic, use none of these modules: {banned}, and return a plain value.
The input is the argument list of one call f(<input>). Give the program in a ```python block and the input in
an ```input block."""

SOLVE = """## Task: Predict the type of a Python program's result
```python
{program}
```
```input
{input}
```
What is the type of the value f returns for this input? Give only its name (int, float, str, bool, list,
tuple, dict, set, NoneType, ...) in an ```output block:
```output
<type name>
```"""


def propose_prompt(task_type, references, banned_words=prompts.BANNED_WORDS, program=None, num_inputs=10) -> str:
    refs = "\n".join(prompts.render_reference(t, i) for i, t in enumerate(references)) or "(none)"
    return PROPOSE.format(references=refs, banned=", ".join(banned_words))


def solve_prompt(task, num_shown=5) -> str:
    return SOLVE.format(program=task.program.strip(), input=task.input.strip())


def type_name(text: str) -> str:
    """'list', "'list'", "<class 'list'>", 'List' -> 'list'."""
    text = text.strip().strip("`").strip()
    if text.startswith("<class ") and text.endswith(">"):
        text = text[len("<class "):-1]
    return text.strip("'\"").strip().lower()


def build_task(proposal, results, iteration, num_shown):
    res = results[0]
    if not res.ok or res.output is None:
        return f"does not execute deterministically: {res.error}"
    if not res.literal:
        return "output is not a plain literal"
    try:
        value = ast.literal_eval(res.output)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return "output is not a plain literal"
    return buffers.Task(NAME, proposal.program, input=proposal.input, output=type(value).__name__, iteration=iteration)


def soft_check(task, proposal, results):
    return "trivial: output equals input" if same_output(results[0].output, proposal.input) else None


def judge(task, answer, results, num_shown) -> bool:
    return type_name(answer.text) == task.output.lower()   # nothing the solver wrote is executed


TYPEOF = rewards.TaskType(
    name=NAME, propose=propose_prompt, solve=solve_prompt,   # no compact prompt: every style is official
    parse_proposal=prompts.parse_io_proposal,                # ```python + ```input, like deduction
    parse_answer=prompts.answer_parser("output"),            # the ```output block, like deduction
    proposal_jobs=lambda p: [(p.program, p.input)], build_task=build_task, soft_check=soft_check,
    answer_jobs=lambda task, answer, num_shown: [], judge=judge,
    seed=lambda: buffers.Task(NAME, rewards.IDENTITY_PROGRAM, "'Hello world'", "str"))
rewards.register_task_type(TYPEOF)

FLAGS = ["--task-types", "deduction", NAME, "--output-dir", "runs/custom_task_type"]


def main(argv: list[str] | None = None) -> int:
    return azr.main(FLAGS + list(sys.argv[1:] if argv is None else argv))   # later flags win


if __name__ == "__main__":
    sys.exit(main())
