"""sandbox.py: the contract, the static screen, trusted equality, and correctness on the 800 CRUXEval programs."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox import (FORBIDDEN_CALLS, FORBIDDEN_MODULES, PREIMPORT, Result, Sandbox, check_inputs,  # noqa: E402
                     check_program, literal_value, output_matches, same_output)

CRUXEVAL = Path(__file__).resolve().parents[1] / "data/cruxeval/cruxeval.jsonl"
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
    prog = "def f(a):\n    return id(object())"                 # an address: differs between processes
    r = sb.run(prog, "1")
    assert r.ok and r.output.isdigit()
    assert sb.run(prog, "1", repeats=2).error == "nondeterministic"
    assert sb.run(prog, "1", repeats=3).error == "nondeterministic"
    rs = sb.run_many([(prog, "1"), ("def f(a):\n    return a", "1")] * 4, repeats=2)
    assert [r.error for r in rs] == ["nondeterministic", None] * 4


def test_repeats_are_separate_processes():
    """Each repeat is its own process calling f once: state kept inside one process (a counter) is invisible,
    so such a program is deterministic; the repeats of a job go to different workers."""
    counter = ("import builtins\ndef f(a):\n    c = builtins.__dict__.setdefault('azr_counter', [])\n"
               "    c.append(1)\n    return len(c)")
    where = "import os\ndef f(a):\n    return os.getppid()"        # the worker that forked this run
    with Sandbox(timeout=2.0, workers=2, screen=False) as box:
        assert box.run(counter, "1", repeats=3).output == "1"
        workers = {w.proc.pid for w in box._workers}
        assert {box.run(where, "1").output for _ in range(4)} <= {str(p) for p in workers}
        r = box.run(where, "1", repeats=2)
        assert r.error == "nondeterministic", r                 # two runs, on the two workers
        rs = box.run_many([(where, "1")] * 10, repeats=2)
        assert all(r.error == "nondeterministic" for r in rs), rs


def test_repeats_failure_reports_the_error_and_timeout_is_per_run(sb):
    r = sb.run("def f(a):\n    return 1 / a", "0", repeats=2)
    assert r.error == "ZeroDivisionError: division by zero" and not r.ok and r.output is None
    # the timeout is per run: two sequential runs (one worker) of 0.7 s each pass a 1 s timeout
    with Sandbox(timeout=1.0, workers=1, screen=False) as box:
        t = time.monotonic()
        r = box.run("import time\ndef f(a):\n    time.sleep(0.7)\n    return a", "5", repeats=2)
        assert r.ok and r.output == "5" and 0.7 <= r.seconds < 1.0, r
        assert time.monotonic() - t > 1.4


def test_no_state_leaks_between_runs(sb):
    prog = ("import math\ndef f(a):\n    seen = hasattr(math, 'azr_mark')\n    math.azr_mark = 1\n"
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
    assert set(caps) >= {"netns", "nocaps", "landlock", "seccomp", "net_blocked", "nodump"}
    if sys.platform == "linux" and os.uname().machine == "x86_64" and os.geteuid() == 0:
        assert caps["netns"] and caps["seccomp"] and caps["net_blocked"] and caps["nocaps"] and caps["nodump"]


# ---------------------------------------------------------------- static screen


def test_default_forbidden_modules():
    for m in ("logging", "random", "multiprocessing", "pebble", "subprocess", "threading", "datetime", "time",
              "hashlib", "hmac", "bcrypt", "calendar", "os", "sys", "shutil", "socket", "signal", "ctypes",
              "importlib", "pathlib", "io", "builtins",
              "inspect", "gc", "types", "pickle", "marshal", "copyreg", "shelve", "dill", "code", "codeop", "pdb",
              "runpy", "pkgutil", "zipimport", "tracemalloc", "faulthandler", "mmap", "fcntl", "resource", "pty",
              "posix", "_thread", "_posixsubprocess", "_ctypes", "ctypes", "tempfile", "glob", "sysconfig", "site",
              "platform", "asyncio", "concurrent", "socketserver", "http", "urllib", "ftplib", "smtplib",
              "webbrowser", "xmlrpc", "sqlite3", "dbm", "tarfile", "zipfile", "atexit", "string"):
        assert m in FORBIDDEN_MODULES
    for c in ("__import__", "open", "exec", "eval", "compile", "input", "breakpoint", "globals", "getattr",
              "setattr", "delattr", "vars", "locals", "dir", "__build_class__"):
        assert c in FORBIDDEN_CALLS
    assert not set(PREIMPORT) & set(FORBIDDEN_MODULES)          # nothing preloaded that programs may not import


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
    # attributes and names that reach interpreter internals
    ("def f(a): return a.__class__", "forbidden attribute: __class__"),
    ("def f(a): return ().__class__.__base__.__subclasses__()", "forbidden attribute: __subclasses__"),
    ("def f(a): return f.__globals__", "forbidden attribute: __globals__"),
    ("def f(a):\n    a.__dict__['x'] = 1", "forbidden attribute: __dict__"),
    ("def f(a):\n    g = (x for x in a)\n    return g.gi_frame", "forbidden attribute: gi_frame"),
    ("def f(a):\n    g = (x for x in a)\n    return g.gi_frame.f_back.f_builtins", "forbidden attribute: f_builtins"),
    ("def f(a):\n    try:\n        1 / 0\n    except Exception as e:\n        return e.__traceback__.tb_frame",
     "forbidden attribute: tb_frame"),
    ("async def g():\n    pass\ndef f(a):\n    return g().cr_frame.f_globals", "forbidden attribute: f_globals"),
    ("def f(a):\n    match a:\n        case object(__class__=c):\n            return c",
     "forbidden attribute: __class__"),
    ("def f(a): return __builtins__", "forbidden name: __builtins__"),
    ("def f(a): return __loader__.load_module('os')", "forbidden name: __loader__"),
    ("import collections\ndef f(a): return collections._sys", "forbidden attribute: _sys"),
    ("import typing\ndef f(a): return typing.sys.modules", "forbidden attribute: sys"),
    ("import codecs\ndef f(a): return codecs.open(3, 'w')", "forbidden attribute: open"),
    ("import typing\ndef f(a): return typing.get_type_hints(a)", "forbidden attribute: get_type_hints"),
    ("import operator\ndef f(a): return operator.attrgetter('x')(a)", "forbidden attribute: attrgetter"),
    ("from operator import methodcaller\ndef f(a): return a", "forbidden attribute: methodcaller"),
    ("from typing import *\ndef f(a): return a", "forbidden import: from typing import *"),
    ("import _io\ndef f(a): return a", "forbidden import: _io"),
    ("import xml.etree._x\ndef f(a): return a", "forbidden attribute: _x"),
    # string.Formatter().get_field returns real objects: the module is banned, and the names too (a sandbox
    # configured to allow string, like evaluate.py's HumanEval one, still rejects them)
    ("import string\ndef f(a): return string.Formatter().get_field('0.x', [a], {})", "forbidden import: string"),
    ("def f(a, string): return string.Formatter()", "forbidden attribute: Formatter"),
    ("def f(a, F): return F().get_field('0', [a], {})", "forbidden attribute: get_field"),
    # builtins that reach attributes or namespaces by string
    ("def f(a): return getattr(a, '__class__')", "forbidden call: getattr"),
    ("def f(a): setattr(a, 'x', 1)", "forbidden call: setattr"),
    ("def f(a): delattr(a, 'x')", "forbidden call: delattr"),
    ("def f(a): return vars(a)", "forbidden call: vars"),
    ("def f(a): return locals()", "forbidden call: locals"),
    ("def f(a): return dir(a)", "forbidden call: dir"),
    ("def f(a): return list(map(getattr, [a], ['x']))", "forbidden name: getattr"),
    ("def f(a): return __build_class__(a, 'X')", "forbidden call: __build_class__"),
    ("def g(vars):\n    return vars\ndef f(a):\n    return vars(a)", "forbidden call: vars"),
    # escape-hatch modules
    ("import pickle\ndef f(a): return pickle.loads(a)", "forbidden import: pickle"),
    ("import inspect\ndef f(a): return a", "forbidden import: inspect"),
    ("from gc import get_referrers\ndef f(a): return a", "forbidden import: gc"),
    ("import types\ndef f(a): return a", "forbidden import: types"),
    ("import timeit\ndef f(a): return timeit.timeit(a, number=1)", "forbidden import: timeit"),
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
    "def f(a):\n    vars = [a]\n    dir = 'up'\n    return vars, dir",          # locals named vars and dir
    "def f(vars, dir):\n    return vars + dir",
    "def f(a):\n    getattr = len\n    return getattr(a)",
    "class P:\n    def __init__(self, x):\n        self.x = x\n    def __repr__(self):\n"
    "        return type(self).__name__\n"
    "def f(a):\n    return P(a).x, P.__init__.__name__, f.__name__",
    "import re\ndef f(a):\n    return re.match('a', a).string",                # an attribute named like a module
    "from __future__ import annotations\nfrom math import *\ndef f(a: int) -> int:\n    return floor(a)",
    "if __name__ == '__main__':\n    pass\ndef f(a):\n    return __name__",
])
def test_screen_allows(program):
    assert check_program(program) is None


def test_formatter_rejected_where_string_is_allowed():
    allowed = tuple(m for m in FORBIDDEN_MODULES if m != "string")
    assert check_program("import string\ndef f(a): return string.ascii_lowercase", allowed) is None
    got = check_program("import string\ndef f(a): return string.Formatter().get_field('0', [a], {})", allowed)
    assert got == "forbidden attribute: get_field"
    got = check_program("from string import Formatter\ndef f(a): return a", allowed)
    assert got == "forbidden attribute: Formatter"


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
    assert check_inputs("(x for x in [1]).gi_frame") == "forbidden attribute: gi_frame"
    assert check_inputs("[].__class__") == "forbidden attribute: __class__"
    assert check_inputs("getattr") == "forbidden name: getattr"
    assert check_inputs("__builtins__") == "forbidden name: __builtins__"
    assert check_inputs("lambda vars: vars") is None


# ---------------------------------------------------------------- trusted equality


def test_same_output_cases():
    assert same_output("[1, 2]", "[1,2]")
    assert same_output("{'a': 1, 'b': 2}", "{'b': 2, 'a': 1}")
    assert same_output("{'x', 'y'}", "{'y', 'x'}")
    assert same_output("1", "1.0") and same_output("True", "1")     # Python equality, as AZR and CRUXEval
    assert not same_output("(1, 2)", "[1, 2]")
    assert not same_output("'1'", "1")
    assert same_output("nan", "nan") and not same_output("nan", "inf")
    assert same_output("[nan, 1]", "[nan, 1]") and not same_output("[nan, 1]", "[nan,1]")   # nan != nan
    assert same_output("[inf, 1]", "[inf,1]") and same_output("-inf", "-1e999") and not same_output("inf", "-inf")
    assert same_output("(inf+1j)", "(inf + 1j)") and same_output("{'a': inf}", "{'a': 1e400}")
    assert not same_output("inf", "'inf'") and not same_output("infinity", "inf")
    assert same_output("<Foo>", "<Foo>") and not same_output("<Foo>", "<Bar>")
    assert not same_output(None, "1") and not same_output("1", None) and not same_output(None, None)
    assert not same_output("[" * 5000 + "]" * 5000, "[]")          # parser limits: no crash
    assert not same_output("__import__('os').system('true')", "0")  # never evaluated


def test_inf_nan_literals(sb):
    assert literal_value("[inf, -inf, 1]") == [math.inf, -math.inf, 1]
    v = literal_value("(nan, infj)")
    assert math.isnan(v[0]) and v[1] == complex(0, math.inf)
    for bad in ("infinity", "Inf", "nan()", "inf.real", "x"):
        with pytest.raises(ValueError):
            literal_value(bad)
    r = sb.run("def f(a):\n    return [float(a), -float(a), 1]", "'inf'", repeats=2)
    assert r.ok and r.output == "[inf, -inf, 1]" and r.literal
    assert output_matches(r, "[inf, -inf, 1]") and output_matches(r, "[1e999, -1e999, 1]")
    r = sb.run("def f(a):\n    return {'x': float(a)}", "'nan'", repeats=2)
    assert r.ok and r.output == "{'x': nan}" and r.literal          # identical text across the two runs
    assert output_matches(r, "{'x': nan}") and not output_matches(r, "{'x': nan }")


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
    with pytest.warns(RuntimeWarning, match="degraded.*landlock, seccomp.*RLIMIT_NPROC does not stop root"):
        sb._on_ready(w, {"netns": True, "nocaps": True, "landlock": False, "seccomp": False, "net_blocked": True,
                         "nodump": True})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb._on_ready(w, {"netns": False})                  # second time: silent
    w.caps = saved


def test_degraded_isolation_warns_from_init(monkeypatch):
    """The warning comes from Sandbox() itself (it waits for the workers' start-up), not from the first run."""
    import warnings

    import sandbox
    monkeypatch.setattr(sandbox, "_WARNED", False)
    with pytest.warns(RuntimeWarning, match="unavailable here: landlock, seccomp.*can fork") as rec:
        box = Sandbox(timeout=1.0, workers=1, _disable=("landlock", "seccomp"))
    try:
        assert rec[0].filename == __file__                    # attributed to the caller's line
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert box.run(IDENTITY, "3").output == "3"
    finally:
        box.close()


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
