"""sandbox.py: the contract, the static screen, trusted equality, and correctness on the 800 CRUXEval programs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox import (FORBIDDEN_MODULES, Result, Sandbox, check_inputs, check_program,  # noqa: E402
                     output_matches, same_output)

CRUXEVAL = Path(__file__).resolve().parents[2] / "shared/data/cruxeval/cruxeval.jsonl"
IDENTITY = "def f(a):\n    return a"


@pytest.fixture(scope="module")
def sb():
    with Sandbox(timeout=2.0, memory_mb=512) as box:
        yield box


# ---------------------------------------------------------------- contract


def test_contract_basic(sb):
    r = sb.run(IDENTITY, "'Hello world'")
    assert isinstance(r, Result)
    assert (r.ok, r.output, r.error, r.literal) == (True, "'Hello world'", None, True)
    r = sb.run("def f(a, b):\n    return {'k': a, 's': sorted(b)}", "1, [3, 2]", repeats=2)
    assert r.ok and r.output == "{'k': 1, 's': [2, 3]}"


def test_errors_are_short_reasons(sb):
    assert sb.run("def f(a):\n    return a / 0", "1").error == "ZeroDivisionError: division by zero"
    assert sb.run("def f(a):\n    return a +", "1").error.startswith("SyntaxError: ")
    assert sb.run("def g(a):\n    return a", "1").error == "no function f"
    assert sb.run("import os\ndef f(a):\n    return a", "1").error == "forbidden import: os"
    assert sb.run("def f(a):\n    return open('x')", "1").error == "forbidden call: open"
    assert sb.run("def f(a):\n    raise KeyError('k')", "1").error == "KeyError: 'k'"
    assert sb.run("def f(a):\n    while True:\n        pass", "1").error == "timeout"
    assert sb.run("def f(a):\n    return bytearray(10**10)", "1").error == "memory"
    assert sb.run("def f(a):\n    return f(a)", "1").error.startswith("RecursionError")
    assert sb.run("f = 3", "1").error == "no function f"
    r = sb.run(IDENTITY, "1, 2")
    assert not r.ok and r.error.startswith("TypeError: f() takes 1 positional argument")


def test_stdout_captured_and_capped(sb):
    r = sb.run("def f(a):\n    print('hello', a)\n    return a", "7")
    assert r.ok and r.stdout == "hello 7\n"
    r = sb.run("def f(a):\n    print('x' * 100000)\n    return a", "7")
    assert r.ok and 0 < len(r.stdout) <= 4000


def test_repeats_determinism(sb):
    assert sb.run("def f(a):\n    return [a] * 3", "1", repeats=2).ok
    prog = ("def f(a):\n    c = __builtins__.__dict__.setdefault('azr_counter', [])\n"
            "    c.append(1)\n    return len(c)")
    assert sb.run(prog, "1", repeats=1).ok
    assert sb.run(prog, "1", repeats=2).error == "nondeterministic"
    assert sb.run(prog, "1", repeats=3).error == "nondeterministic"


def test_no_state_leaks_between_runs(sb):
    prog = ("def f(a):\n    seen = hasattr(__builtins__, 'azr_mark')\n    __builtins__.azr_mark = 1\n"
            "    return seen")
    assert [r.output for r in sb.run_many([(prog, "1")] * 6)] == ["False"] * 6


def test_run_many_keeps_order_and_mixes_errors(sb):
    jobs = [(f"def f(a):\n    return a * {i}", str(i)) for i in range(20)]
    jobs[5] = ("def f(a):\n    return 1 / 0", "1")
    jobs[9] = ("import socket\ndef f(a):\n    return a", "1")
    jobs[13] = ("def f(a):\n    while True:\n        pass", "1")
    rs = sb.run_many(jobs, repeats=2)
    assert len(rs) == 20
    for i, r in enumerate(rs):
        if i == 5:
            assert r.error == "ZeroDivisionError: division by zero"
        elif i == 9:
            assert r.error == "forbidden import: socket"
        elif i == 13:
            assert r.error == "timeout"
        else:
            assert r.ok and r.output == repr(i * i), (i, r)
    assert sb.run_many([]) == []


def test_hash_seed_fixed_across_workers(sb):
    prog = "def f(a):\n    return list({'apple', 'pear', 'fig', 'kiwi', 'plum', 'lime'}) + [hash('x')]"
    outs = {r.output for r in sb.run_many([(prog, "0")] * 8, repeats=2)}
    assert len(outs) == 1 and None not in outs


def test_output_cap_and_literal_flag(sb):
    r = sb.run("def f(a):\n    return 'x' * a", "1000")
    assert not r.ok and r.error.startswith("output too long")
    r = sb.run("def f(a):\n    return list(range(a))", "100000")
    assert r.error.startswith("output too long")
    r = sb.run("def f(a):\n    return (1, 2.5, -3j, b'x', None, frozenset({1}), {'a': [set()]})", "0")
    assert r.ok and r.literal
    r = sb.run("def f(a):\n    return (x for x in a)", "[1]")
    assert r.ok and not r.literal and r.output.startswith("<generator")
    r = sb.run("def f(a):\n    a.append(a)\n    return a", "[1]")
    assert r.ok and r.output == "[1, [...]]" and not r.literal


def test_worker_replaced_after_kill(sb):
    sb.capabilities
    victim = sb._workers[0].proc.pid
    os.kill(victim, 9)
    rs = sb.run_many([(IDENTITY, str(i)) for i in range(6)])
    assert all(r.ok for r in rs) or any(r.error == "sandbox worker died" for r in rs)
    assert all(w.proc.pid != victim for w in sb._workers)
    assert sb.run(IDENTITY, "5").output == "5"


def test_close_leaves_no_process_and_rejects_use():
    box = Sandbox(timeout=1.0, workers=2)
    box.run_many([(IDENTITY, "1"), ("def f(a):\n    while True:\n        pass", "1")])
    pids = [w.proc.pid for w in box._workers]
    base = box.base_dir
    box.close()
    box.close()  # idempotent
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert not Path(base).exists()
    with pytest.raises(RuntimeError):
        box.run(IDENTITY, "1")


def test_capabilities_on_linux(sb):
    caps = sb.capabilities
    assert set(caps) >= {"netns", "nocaps", "landlock", "seccomp", "net_blocked"}
    if sys.platform == "linux" and os.uname().machine == "x86_64" and os.geteuid() == 0:
        assert caps["netns"] and caps["seccomp"] and caps["net_blocked"] and caps["nocaps"]


# ---------------------------------------------------------------- static screen


def test_default_forbidden_modules():
    for m in ("logging", "random", "multiprocessing", "pebble", "subprocess", "threading", "datetime", "time",
              "hashlib", "hmac", "bcrypt", "calendar", "os", "sys", "shutil", "socket", "signal", "ctypes",
              "importlib", "pathlib", "io", "builtins"):
        assert m in FORBIDDEN_MODULES


@pytest.mark.parametrize("program, reason", [
    ("import os\ndef f(a): return a", "forbidden import: os"),
    ("import os.path as p\ndef f(a): return a", "forbidden import: os"),
    ("from os import path\ndef f(a): return a", "forbidden import: os"),
    ("def f(a):\n    import subprocess\n    return a", "forbidden import: subprocess"),
    ("from . import x\ndef f(a): return a", "forbidden import: relative import"),
    ("def f(a): return __import__('os')", "forbidden call: __import__"),
    ("def f(a): return eval(a)", "forbidden call: eval"),
    ("def f(a): return exec(a)", "forbidden call: exec"),
    ("def f(a): return compile(a, 'x', 'eval')", "forbidden call: compile"),
    ("def f(a): return input()", "forbidden call: input"),
    ("def f(a): breakpoint()", "forbidden call: breakpoint"),
    ("def f(a): return globals()", "forbidden call: globals"),
    ("def f(a):\n    g = eval\n    return g(a)", "forbidden name: eval"),
    ("def g():\n    open = 1\ndef f(a):\n    return open(a)", "forbidden call: open"),
    ("def f(a):\n    x = [open for open in a]\n    return open(a)", "forbidden call: open"),
    ("def f(a: int) -> int\n    return a", "SyntaxError: "),
    ("def g(a): return a", "no function f"),
    ("class f: pass", "no function f"),
])
def test_screen_rules(program, reason):
    got = check_program(program)
    assert got is not None and got.startswith(reason), got


@pytest.mark.parametrize("program", [
    IDENTITY,
    "def f(text, input):\n    return text.count(input)",                 # a parameter named input (CRUXEval)
    "def f(a):\n    input = a * 2\n    return input",                     # a local named input
    "input = 3\ndef f(a):\n    return a + input",                         # a module-level name
    "def f(a):\n    def g(open):\n        return open + 1\n    return g(a)",
    "import math, re, collections\nfrom itertools import chain\ndef f(a):\n    return math.floor(a)",
    "def f(a):\n    return [eval for eval in a]",
])
def test_screen_allows(program):
    assert check_program(program) is None


def test_screen_configurable():
    assert check_program("import math\ndef f(a): return a", forbidden_modules=("math",)) == "forbidden import: math"
    assert check_program("import os\ndef f(a): return a", forbidden_modules=()) is None


def test_check_inputs():
    assert check_inputs("1, [2, 3]") is None
    assert check_inputs("'abc', {'k': 1}") is None
    assert check_inputs("__import__('os')") == "forbidden call: __import__"
    assert check_inputs("1), (2") == "invalid inputs"
    assert check_inputs("1)\nprint(2") is not None
    assert check_inputs("[1,").startswith("SyntaxError in inputs")


# ---------------------------------------------------------------- trusted equality


def test_same_output_cases():
    assert same_output("[1, 2]", "[1,2]")
    assert same_output("{'a': 1, 'b': 2}", "{'b': 2, 'a': 1}")
    assert same_output("{'x', 'y'}", "{'y', 'x'}")
    assert same_output("1", "1.0") and not same_output("1", "1.0", strict=True)
    assert same_output("True", "1") and not same_output("True", "1", strict=True)
    assert same_output("(1, [True])", "(1, [True])", strict=True)
    assert not same_output("(1, 2)", "[1, 2]")
    assert not same_output("'1'", "1")
    assert same_output("nan", "nan") and not same_output("nan", "inf")
    assert same_output("<Foo>", "<Foo>") and not same_output("<Foo>", "<Bar>")
    assert not same_output(None, "1") and not same_output("1", None) and not same_output(None, None)
    assert not same_output("[" * 5000 + "]" * 5000, "[]")          # parser limits: no crash
    assert not same_output("__import__('os').system('true')", "0")  # never evaluated


def test_output_matches_requires_literal():
    assert output_matches(Result(ok=True, output="[1]", literal=True), "[1]")
    assert not output_matches(Result(ok=True, output="[1]", literal=False), "[1]")
    assert not output_matches(Result(ok=False, output="[1]", literal=True), "[1]")


literals = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.integers() | st.text(max_size=3), inner, max_size=3),
    max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(literals, literals)
def test_same_output_is_python_equality_on_literals(a, b):
    assert same_output(repr(a), repr(a))
    assert same_output(repr(a), repr(b)) == (a == b)


# ---------------------------------------------------------------- CRUXEval


@pytest.mark.skipif(not CRUXEVAL.exists(), reason="CRUXEval data not present")
def test_cruxeval_800_exact(sb):
    rows = [json.loads(line) for line in CRUXEVAL.open()]
    assert len(rows) == 800
    for row in rows:
        assert check_program(row["code"]) is None, row["id"]
    t = time.perf_counter()
    results = sb.run_many([(row["code"], row["input"]) for row in rows], repeats=2)
    elapsed = time.perf_counter() - t
    bad = [(row["id"], r.error, r.output) for row, r in zip(rows, results) if not same_output(r.output, row["output"])]
    assert not bad, bad[:5]
    assert sum(r.output == row["output"] for row, r in zip(rows, results)) == 800
    assert all(r.literal for r in results)
    assert elapsed < 40, elapsed


def test_degraded_isolation_warns_once(sb, monkeypatch):
    import sandbox
    monkeypatch.setattr(sandbox, "_WARNED", False)
    w = sb._workers[0]
    saved = dict(w.caps)
    with pytest.warns(RuntimeWarning, match="degraded.*landlock, seccomp"):
        sb._on_ready(w, {"netns": True, "nocaps": True, "landlock": False, "seccomp": False, "net_blocked": True})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb._on_ready(w, {"netns": False})                  # second time: silent
    w.caps = saved


def test_threads_share_a_sandbox(sb):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: sb.run(IDENTITY, str(i)).output, range(12)))
    assert outs == [str(i) for i in range(12)]


def test_stdlib_imports_work_but_not_site_packages(sb):
    prog = "import statistics, heapq, fractions\ndef f(a):\n    return statistics.median(a), heapq.nlargest(1, a)"
    r = sb.run(prog, "[3, 1, 2]")
    assert r.ok and r.output == "(2, [3])", r
    r = sb.run("import pytest\ndef f(a):\n    return a", "1")       # installed, but not for sandboxed code
    assert r.error.startswith("ModuleNotFoundError"), r
