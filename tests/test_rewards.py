"""Rewards, proposal validation (hard/soft checks, force-accept) and answer checking, on the real sandbox.

`sb` wraps one real sandbox.Sandbox and records each run_many batch, so tests also check that validation
and checking cost one batch each."""
import dataclasses
import json
from pathlib import Path

import pytest

from buffers import Task
from prompts import Answer, Proposal
from rewards import (BUILTIN_TASK_TYPES, DEDUCTION, INVALID_PROPOSAL_REWARD, TASK_TYPES, check_answers,
                     literal_args, normalize_input, parse_answer, parse_proposal, proposer_reward,
                     register_task_type, seed_task, solver_reward, validate_proposals)
from sandbox import Sandbox

CRUX = Path(__file__).resolve().parents[1] / "data/cruxeval/cruxeval.jsonl"


class CountingSandbox:
    """The real sandbox, recording (len(jobs), repeats) of every run_many batch."""

    def __init__(self, sandbox: Sandbox):
        self.sandbox, self.forbidden_modules = sandbox, sandbox.forbidden_modules
        self.batches: list[tuple[int, int]] = []

    def run_many(self, jobs, repeats=1):
        self.batches.append((len(jobs), repeats))
        return self.sandbox.run_many(jobs, repeats=repeats)


@pytest.fixture(scope="module")
def real_sb():
    with Sandbox(timeout=5.0, workers=2) as sandbox:
        yield sandbox


@pytest.fixture
def sb(real_sb) -> CountingSandbox:
    return CountingSandbox(real_sb)


def wrap(body: str) -> str:
    return f"<think>t</think><answer>{body}</answer>"


def io_text(program: str, inp: str) -> str:
    return wrap(f"```python\n{program}\n```\n```input\n{inp}\n```")


def ind_text(inputs, message="hint") -> str:
    return wrap("\n".join(f"```input\n{i}\n```" for i in inputs) + (f"\n```message\n{message}\n```" if message else ""))


DOUBLE = "def f(x):\n    return x * 2"
ADDRESS = "def f(x):\n    return id(object()) % 1000003"   # differs between processes: not deterministic


# ----------------------------------------------------------------------------- reward values

def test_proposer_reward_paper_and_code_extremes():
    assert proposer_reward(0.25) == pytest.approx(0.75)
    assert proposer_reward(0.5) == 0.5 and proposer_reward(7 / 8) == pytest.approx(1 / 8)
    assert proposer_reward(0.0) == -0.5 and proposer_reward(1.0) == -0.5          # official code (default)
    assert proposer_reward(0.0, extreme_reward=0.0) == 0.0                        # paper Eq. 4
    assert proposer_reward(1.0, extreme_reward=0.0) == 0.0
    assert proposer_reward(0.5, extreme_reward=0.0) == 0.5
    assert INVALID_PROPOSAL_REWARD == -1.0


def test_solver_reward_cases():
    assert solver_reward(True, True) == 1.0
    assert solver_reward(False, True) == -0.5
    assert solver_reward(False, False) == -1.0
    assert solver_reward(True, False) == -1.0      # format error dominates


def test_literal_args_and_normalize_input():
    assert literal_args("'a', [1, 2], {'k': (3,)}, k=-1.5")
    assert literal_args("1")
    assert literal_args("")      # f(): no arguments is a (vacuously) literal argument list
    assert not literal_args("x") and not literal_args("f(1)") and not literal_args("*[1]") and not literal_args("**{}")
    assert not literal_args("type('X', (), {})()") and not literal_args("1) + (2") and not literal_args("1,,")
    assert normalize_input("1,2") == normalize_input(" 1 , 2 ") != normalize_input("2, 1")
    assert normalize_input("((") == "(("


# ----------------------------------------------------------------------------- validation

def test_validate_deduction_abduction_one_batch_repeats_2(sb):
    props = [parse_proposal("deduction", io_text(DOUBLE, "21")),
             parse_proposal("deduction", io_text("def f(s):\n    return s[::-1]", "'abc'"))]
    out = validate_proposals(sb, "deduction", props, iteration=4)
    assert sb.batches == [(2, 2)]
    assert [v.valid for v in out] == [True, True] and all(v.reason is None and not v.force_accepted for v in out)
    assert out[0].task == Task("deduction", DOUBLE, "21", "42", iteration=4)
    assert out[1].task.output == "'cba'"
    out = validate_proposals(sb, "abduction", props[:1], iteration=0)
    assert out[0].task.task_type == "abduction"


def test_validate_hard_failures(sb):
    props = [
        parse_proposal("deduction", "nothing here"),                                   # parse failure
        parse_proposal("deduction", io_text("import os\ndef f(x):\n    return x", "1")),  # static screen
        parse_proposal("deduction", io_text("def f(x):\n    return 1 / 0", "1")),     # raises
        parse_proposal("deduction", io_text(ADDRESS, "1")),                            # nondeterministic
        parse_proposal("deduction", io_text("def f(x:\n", "1")),                       # syntax error
        parse_proposal("deduction", wrap("```python\ndef f(x):\n    return x\n```")),  # no input
        Proposal(program="", input="1"),                                               # no program
    ]
    for force in (False, True):
        out = validate_proposals(sb, "deduction", props, 0, force_accept=force)
        assert all(not v.valid and v.hard and v.reason for v in out), out
    assert "nondeterministic" in out[3].reason and "forbidden import: os" in out[1].reason


def test_validate_admits_like_the_official_code_and_strict_checks_are_an_option(sb):
    existing = [Task("deduction", DOUBLE, "5", "10")]
    props = [
        parse_proposal("deduction", f"```python\n{DOUBLE}\n```\n```input\n1\n```"),   # no tags
        parse_proposal("deduction", io_text("def f(x):\n    return x*2  # same", "5")),  # duplicate of buffer
        parse_proposal("deduction", io_text("def f(a):\n    return a", "'q'")),       # trivial: output == input
        parse_proposal("deduction", io_text("def f(*a):\n    return a", "1, 2")),      # trivial for several args
        parse_proposal("deduction", io_text(DOUBLE, "7")),                             # fine
        parse_proposal("deduction", io_text(DOUBLE, "7")),                             # duplicate within batch
        parse_proposal("deduction", io_text("class A:\n    pass\ndef f(x):\n    return A", "1")),  # not literal
    ]
    assert not props[0].well_formatted and all(p.well_formatted for p in props[1:])
    default = validate_proposals(sb, "deduction", props, 3, existing=existing)
    assert all(v.valid for v in default) and not any(v.hard or v.force_accepted for v in default)
    reasons = [v.reason or "" for v in default]     # reported, not enforced; the format is not a check at all
    assert reasons[0] == "" and reasons[1] == "duplicate" and "trivial" in reasons[2]
    assert "trivial" in reasons[3] and reasons[4] == "" and reasons[5] == "duplicate" and "literal" in reasons[6]
    strict = validate_proposals(sb, "deduction", props, 3, existing=existing, strict=True)
    assert [v.valid for v in strict] == [True, True, False, False, True, True, False]   # duplicates stay valid
    assert [v.reason for v in strict] == [v.reason for v in default]
    forced = validate_proposals(sb, "deduction", props, 3, existing=existing, strict=True, force_accept=True)
    assert all(v.valid for v in forced)
    assert [v.force_accepted for v in forced] == [False, False, True, True, False, False, True]


def test_validate_induction_rule(sb):
    prog = "def f(x):\n    return 10 // x"
    inputs = ["1", "2", "2", " 2", "0", "5", "10", "x", "-1", "3", "4"]   # dups, a crash, a NameError
    p = parse_proposal("induction", ind_text(inputs), program=prog)
    (v,) = validate_proposals(sb, "induction", [p], 9, num_shown=5)
    assert sb.batches == [(11, 2)]
    assert v.valid and v.reason is None
    assert v.task.inputs == ["1", "2", "5", "10", "-1", "3", "4"]
    assert v.task.outputs == ["10", "5", "2", "1", "-10", "3", "2"] and v.task.message == "hint"
    assert v.task.iteration == 9 and v.task.program == prog and v.task.task_type == "induction"
    # exactly num_shown + 1 usable inputs is enough, num_shown is not (hard, even when forced)
    ok = validate_proposals(sb, "induction", [parse_proposal("induction", ind_text(["1", "2", "3", "4", "5", "6"]),
                                                             program=prog)], 0, num_shown=5)
    assert ok[0].valid
    few = parse_proposal("induction", ind_text(["1", "2", "3", "4", "5", "0", "5"]), program=prog)
    for force in (False, True):
        (v,) = validate_proposals(sb, "induction", [few], 0, num_shown=5, force_accept=force)
        assert not v.valid and v.hard and "need 6" in v.reason
    nop = parse_proposal("induction", ind_text(["1", "2"]))       # program not passed through
    assert validate_proposals(sb, "induction", [nop], 0)[0].reason == "no program"
    # at most num_shown shown + num_shown held out: extra usable inputs are dropped
    many = parse_proposal("induction", ind_text([str(i) for i in range(1, 15)]), program=prog)
    (v,) = validate_proposals(sb, "induction", [many], 0, num_shown=5)
    assert v.valid and v.task.inputs == [str(i) for i in range(1, 11)]


def test_validate_induction_soft(sb):
    const = parse_proposal("induction", ind_text([str(i) for i in range(10)]), program="def f(x):\n    return 0")
    nomsg = parse_proposal("induction", ind_text([str(i) for i in range(10)], message=None), program=DOUBLE)
    out = validate_proposals(sb, "induction", [const, nomsg], 0, strict=True)
    assert [v.valid for v in out] == [False, False]
    assert "trivial" in out[0].reason and out[1].reason == "no message"
    assert all(v.valid for v in validate_proposals(sb, "induction", [const, nomsg], 0))   # admitted by default
    out = validate_proposals(sb, "induction", [const, nomsg], 0, strict=True, force_accept=True)
    assert all(v.valid and v.force_accepted for v in out)
    seeded = seed_task("induction")
    dup = parse_proposal("induction", ind_text(seeded.inputs), program=seeded.program)
    assert validate_proposals(sb, "induction", [dup], 0, existing=[seeded])[0].reason == "duplicate"


def test_validate_empty_batch(sb):
    assert validate_proposals(sb, "deduction", [], 0) == [] and sb.batches == []


# ----------------------------------------------------------------------------- answer checking

DED = Task("deduction", DOUBLE, "[1]", "[1, 1]")
ABD = Task("abduction", "def f(a, b):\n    return a + b", "1, 2", "3")
IND = Task("induction", "def f(x):\n    return x * 3", inputs=[str(i) for i in range(8)],
           outputs=[str(3 * i) for i in range(8)], message="triples")


def ans(text: str, well: bool = True) -> Answer:
    return Answer(text, well)


def test_check_deduction_compares_literals_without_running(sb):
    got = check_answers(sb, [DED] * 6, [ans("[1, 1]"), ans("[1,1]"), ans(" [1 , 1] "), ans("[1]"),
                                        ans("f([1])"), ans("")])
    assert got == [True, True, True, False, False, False]
    assert sb.batches == []                        # nothing executed


def test_check_abduction_runs_program_on_predicted_input(sb):
    got = check_answers(sb, [ABD] * 6, [ans("1, 2"), ans("3, 0"), ans("0, 0"), ans("'a'"), ans("1"),
                                        ans("b=2, a=1")])
    assert got == [True, True, False, False, False, True]
    assert sb.batches == [(6, 2)]


def test_check_abduction_runs_only_literal_inputs(sb):
    """An abduction answer is solver-written text that would run as code; only literal argument lists run, so
    an input cannot forge the gold output (shown in the prompt) through a custom __repr__ or an escape."""
    ident = Task("abduction", "def f(a):\n    return a", "'hi'", "'hi'")
    fake_repr = "type('X', (), {'__repr__': lambda s: \"'hi'\"})()"
    computed = "'h' + 'i'"                              # right value, but an expression: not run, not correct
    assert check_answers(sb, [ident] * 3, [ans(fake_repr), ans(computed), ans("'hi'")]) == [False, False, True]
    assert sb.batches == [(1, 2)]                       # only the literal answer ran


def test_check_induction_all_held_out_must_match(sb):
    right = ans("def f(x):\n    return 3 * x")
    shown_only = ans("def f(x):\n    return {0: 0, 1: 3, 2: 6, 3: 9, 4: 12}[x]")     # memorised shown pairs
    almost = ans("def f(x):\n    return 3 * x if x < 7 else 0")                     # one held-out wrong
    crashes = ans("def f(x):\n    return 3 * x if x < 6 else 1 / 0")
    banned = ans("import os\ndef f(x):\n    return 3 * x")
    got = check_answers(sb, [IND] * 6, [right, shown_only, almost, crashes, banned, ans("")], num_shown=5)
    assert got == [True, False, False, False, False, False]
    assert sb.batches == [(12, 2)]                 # 3 held-out inputs x 4 screened programs, one batch


def test_check_induction_renames_a_lone_function_to_f(sb):
    renamed = ans("def triple(x):\n    return triple_of(x)\ndef triple_of(x):\n    return x * 3")   # two: not renamed
    assert check_answers(sb, [IND, IND], [ans("def triple(x):\n    return x * 3"), renamed]) == [True, False]


def test_check_induction_rejects_fake_literal_objects(sb):
    hack = ans("class S(int):\n    def __repr__(self):\n        return '0'\ndef f(x):\n    return S(0)")
    t = Task("induction", "def f(x):\n    return 0", inputs=["1", "2", "3"], outputs=["0", "0", "0"])
    assert check_answers(sb, [t], [hack], num_shown=1) == [False]


def test_check_mixed_batch_is_one_run_many(sb):
    got = check_answers(sb, [DED, ABD, IND], [ans("[1, 1]"), ans("2, 1"), ans("def f(x):\n    return x*3")])
    assert got == [True, True, True] and sb.batches == [(4, 2)]
    with pytest.raises(ValueError):
        check_answers(sb, [DED], [])


def test_end_to_end_parse_validate_check_reward(sb):
    (v,) = validate_proposals(sb, "abduction", [parse_proposal("abduction", io_text(DOUBLE, "'ab'"))], 1)
    texts = [wrap("```input\n'ab'\n```"), wrap("```input\n'x'\n```"), "```input\n'ab'\n```", "no idea"]
    answers = [parse_answer("abduction", t) for t in texts]
    correct = check_answers(sb, [v.task] * 4, answers)
    rs = [solver_reward(c, a.well_formatted) for c, a in zip(correct, answers)]
    assert rs == [1.0, -0.5, -1.0, -1.0]
    lenient = [parse_answer("abduction", t, lenient=True) for t in texts]
    rs = [solver_reward(c, a.well_formatted) for c, a in zip(check_answers(sb, [v.task] * 4, lenient), lenient)]
    assert rs == [1.0, -0.5, 1.0, -0.5]            # warm-up: no format penalty
    assert correct == [True, False, True, False]   # correctness ignores format; solver_reward applies it
    assert proposer_reward(sum(c and a.well_formatted for c, a in zip(correct, answers)) / 4) == 0.75


def test_register_fourth_task_type_rules(sb):
    # "roundtrip": the solver must give an input whose output equals the input itself
    roundtrip = dataclasses.replace(
        DEDUCTION, name="roundtrip",
        build_task=lambda p, res, it, ns: (Task("roundtrip", p.program, p.input, res[0].output, iteration=it)
                                           if res[0].ok else "fails"),
        soft_check=lambda t, p, res: None,
        answer_jobs=lambda t, a, ns: [(t.program, a.text)],
        judge=lambda t, a, res, ns: res[0].ok and res[0].output == a.text,
    )
    try:
        register_task_type(roundtrip)
        (v,) = validate_proposals(sb, "roundtrip", [parse_proposal("deduction", io_text("def f(x):\n    return abs(x)",
                                                                                        "-3"))], 0)
        assert v.valid and v.task.output == "3"
        assert check_answers(sb, [v.task, v.task], [ans("4"), ans("-4")]) == [True, False]
    finally:
        TASK_TYPES.pop("roundtrip", None)


# ----------------------------------------------------------------------------- the real sandbox

def test_real_sandbox_validation_and_checks(real_sb):
    props = [parse_proposal("deduction", io_text(DOUBLE, "21")),
             parse_proposal("deduction", io_text(ADDRESS, "1")),
             parse_proposal("deduction", io_text("def f(x):\n    return 1 / 0", "1")),
             parse_proposal("deduction", io_text("import os\ndef f(x):\n    return x", "1"))]
    out = validate_proposals(real_sb, "deduction", props, 2)
    assert out[0].valid and out[0].task.output == "42"
    assert [v.valid for v in out] == [True, False, False, False] and all(v.hard for v in out[1:])
    ind = parse_proposal("induction", ind_text([str(i) for i in range(10)]), program="def f(x):\n    return x * 3")
    (vi,) = validate_proposals(real_sb, "induction", [ind], 2)
    assert vi.valid and vi.task.outputs[7] == "21"
    abd = Task("abduction", ABD.program, ABD.input, ABD.output)
    got = check_answers(real_sb, [DED, DED, abd, abd, vi.task, vi.task],
                        [ans("[1, 1]"), ans("[1]"), ans("3, 0"), ans("0, 0"), ans("def f(x):\n    return 3 * x"),
                         ans("def f(x):\n    return x")])
    assert got == [True, False, True, False, True, False]


def test_real_sandbox_reward_hacks_rejected(real_sb):
    ident = Task("abduction", "def f(a):\n    return a", "'hi'", "'hi'")
    fake_repr = "type('X', (), {'__repr__': lambda s: \"'hi'\"})()"
    assert check_answers(real_sb, [ident], [ans(fake_repr)]) == [False]
    t = Task("induction", "def f(x):\n    return 0", inputs=["1", "2", "3"], outputs=["0", "0", "0"])
    hack = ans("class S(int):\n    def __repr__(self):\n        return '0'\ndef f(x):\n    return S(5)")
    assert check_answers(real_sb, [t], [hack], num_shown=1) == [False]


def test_validate_existing_may_be_a_task_buffer(sb):
    from buffers import Buffers
    b = Buffers(BUILTIN_TASK_TYPES, seed=seed_task)
    p = parse_proposal("deduction", io_text("def f(a):\n    return a", "'Hello world'"))
    (v,) = validate_proposals(sb, "deduction", [p], 0, existing=b["deduction"])
    assert v.valid and v.reason == "duplicate"
    assert b["deduction"].add([v.task]) == 0          # the buffer keeps it out


def test_real_sandbox_cruxeval_round_trip(real_sb):
    rows = [json.loads(line) for line in CRUX.read_text().splitlines()[:40]]
    props = [parse_proposal("deduction", io_text(r["code"], r["input"])) for r in rows]
    out = validate_proposals(real_sb, "deduction", props, 0, force_accept=True)
    valid = [(v.task, r) for v, r in zip(out, rows) if v.valid]
    assert len(valid) >= 35, [v.reason for v in out if not v.valid]
    tasks = [t for t, _ in valid]
    ded = check_answers(real_sb, tasks, [ans(r["output"]) for _, r in valid])
    abd = check_answers(real_sb, [Task("abduction", t.program, t.input, t.output) for t in tasks],
                        [ans(t.input) for t in tasks])
    assert sum(ded) >= len(tasks) - 2 and sum(abd) >= len(tasks) - 2
