"""Fast, isolated execution of model-written Python: AZR's judge.

Two layers: `check_program` / `check_inputs`, a static `ast` screen that gives validity its reasons (not the
safety boundary), and `Sandbox`, which runs each program in a fresh confined process forked from a pre-warmed
worker and compares the texts the children send back in the trusted parent (`same_output`, `output_matches`).
The kernel rules are in confinement.py. Guarantees, limits and residual risks: docs/SANDBOX.md.
"""

from __future__ import annotations

import ast
import gc
import json
import math
import os
import select
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass


def _import_confinement():
    """confinement.py, the one module of ours the sandbox uses. The worker runs as `python -P -s -S sandbox.py`,
    so this file's directory is not on its sys.path (and must stay off it: the children import from that path);
    there the module is loaded from beside this file, without entering sys.modules."""
    if __name__ != "__main__":
        import confinement
        return confinement
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("confinement", os.path.join(here, "confinement.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


confinement = _import_confinement()


FORBIDDEN_MODULES: tuple[str, ...] = (
    # AZR's list
    "logging", "random", "multiprocessing", "pebble", "subprocess", "threading", "datetime", "time",
    "hashlib", "hmac", "bcrypt", "calendar",
    # ours: escape hatches to the OS or the interpreter
    "os", "sys", "shutil", "socket", "signal", "ctypes", "importlib", "pathlib", "io", "builtins",
    "inspect", "gc", "types", "pickle", "marshal", "copyreg", "shelve", "dill", "code", "codeop", "pdb", "runpy",
    "pkgutil", "zipimport", "tracemalloc", "faulthandler", "mmap", "fcntl", "resource", "pty", "posix", "_thread",
    "_posixsubprocess", "_ctypes", "tempfile", "glob", "sysconfig", "site", "platform", "asyncio", "concurrent",
    "socketserver", "http", "urllib", "ftplib", "smtplib", "webbrowser", "xmlrpc", "sqlite3", "dbm", "tarfile",
    "zipfile", "atexit", "string",
    # ours: modules that run source text or resolve dotted names, bypassing the screen
    "timeit", "doctest", "cProfile", "profile", "trace", "pydoc", "unittest", "bdb", "rlcompleter", "idlelib",
    "ensurepip", "venv", "tkinter", "turtle",
)
FORBIDDEN_CALLS: tuple[str, ...] = (
    "__import__", "open", "exec", "eval", "compile", "input", "breakpoint", "globals",
    "getattr", "setattr", "delattr", "vars", "locals", "dir", "__build_class__",
)
# Attribute names rejected wherever they appear (`x.name`, `from m import name`, `case C(name=...)`): frame,
# code and generator internals; string-keyed attribute access; string.Formatter's object lookup; `open` (e.g.
# codecs.open(3, 'w') writes to any fd); typing.get_type_hints (evaluates annotation strings).
FORBIDDEN_ATTRIBUTES: frozenset[str] = frozenset({
    "gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code", "f_back", "f_builtins", "f_globals",
    "f_locals", "f_code", "f_trace", "tb_frame", "tb_next",
    "attrgetter", "methodcaller", "Formatter", "get_field", "open", "get_type_hints",
})
# Dunder attributes (`x.__name__`) and dunder names allowed; every other `__x__` attribute or name is rejected.
ALLOWED_DUNDER_ATTRIBUTES: frozenset[str] = frozenset({"__init__", "__name__", "__qualname__", "__doc__"})
ALLOWED_DUNDER_NAMES: frozenset[str] = frozenset({"__name__", "__doc__", "__debug__"})
# Forbidden modules that are banned for nondeterminism, not because their module object is an escape hatch:
# an attribute with such a name (`m.string`, `d.time`) stays fine. Any other forbidden module's name (`x.os`,
# `typing.sys`, `collections._sys`) is rejected as an attribute, so a module that imported it cannot hand it out.
_HARMLESS_MODULE_NAMES = frozenset({"random", "datetime", "time", "calendar", "hashlib", "hmac", "bcrypt", "string"})
# `from m import *` only from these (a star import hides which names it binds from the screen).
_STAR_IMPORT_OK = frozenset({"math", "cmath", "itertools", "collections", "heapq", "bisect", "fractions", "decimal",
                             "statistics", "functools"})
# Modules imported once by every worker, so programs that use them pay nothing per run.
PREIMPORT: tuple[str, ...] = (
    "collections", "collections.abc", "itertools", "functools", "math", "cmath", "re", "heapq",
    "bisect", "operator", "copy", "json", "fractions", "decimal", "typing", "dataclasses",
    "enum", "textwrap", "unicodedata", "array", "numbers", "struct", "base64", "binascii", "difflib",
    "pprint", "keyword", "abc", "contextlib", "reprlib", "codecs", "zlib", "weakref",
)


@dataclass
class Result:
    ok: bool                      # program ran and f(<inputs>) returned (in every repeat process, identically)
    output: str | None = None     # repr() of the return value (at most max_output_chars, else an error)
    error: str | None = None      # short reason when not ok: 'timeout', 'memory', 'forbidden import: os', ...
    literal: bool = False         # the returned value was a plain literal (see module doc); False if not ok
    stdout: str = ""              # captured stdout+stderr of the (first, or failed) child (capped)
    seconds: float = 0.0          # wall time of the slowest run's child as measured by its worker


# ----------------------------------------------------------------------------------------------------------
# static screen


def _targets(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]


def _scope_bindings(body: list[ast.AST]) -> set[str]:
    """Names bound directly in one scope (not inside nested functions, lambdas, classes or comprehensions)."""
    bound: set[str] = set()
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            stack.extend(node.decorator_list)
            if not isinstance(node, ast.ClassDef):
                stack.extend(d for d in node.args.defaults + node.args.kw_defaults if d is not None)
            continue
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            if isinstance(node, ast.Lambda):
                stack.extend(d for d in node.args.defaults + node.args.kw_defaults if d is not None)
            else:
                stack.append(node.generators[0].iter)
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bound.add(node.rest)
        stack.extend(ast.iter_child_nodes(node))
    return bound


def _arg_names(args: ast.arguments) -> set[str]:
    all_args = args.posonlyargs + args.args + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
    return {a.arg for a in all_args}


def _forbidden_name_use(tree: ast.AST, forbidden: set[str]) -> str | None:
    """Scope-aware: a forbidden builtin used where no enclosing scope binds that name."""

    def visit(node: ast.AST, scopes: list[set[str]]) -> str | None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            body = node.body if isinstance(node.body, list) else [node.body]
            inner = scopes + [_arg_names(node.args) | _scope_bindings(body)]
            for child in body:
                if (r := visit(child, inner)):
                    return r
            extra = node.decorator_list if not isinstance(node, ast.Lambda) else []
            for child in extra + [d for d in node.args.defaults + node.args.kw_defaults if d is not None]:
                if (r := visit(child, scopes)):
                    return r
            return None
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            bound = set()
            for g in node.generators:
                bound.update(_targets(g.target))
            inner = scopes + [bound]
            for child in ast.iter_child_nodes(node):
                if (r := visit(child, inner)):
                    return r
            return None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in forbidden:
            if not any(node.func.id in s for s in scopes):
                return f"forbidden call: {node.func.id}"
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in forbidden:
            if not any(node.id in s for s in scopes):
                return f"forbidden name: {node.id}"
        for child in ast.iter_child_nodes(node):
            if (r := visit(child, scopes)):
                return r
        return None

    module_scope = _scope_bindings(tree.body) if isinstance(tree, ast.Module) else set()
    return visit(tree, [module_scope])


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _attribute_rule(name: str, handles: frozenset[str]) -> str | None:
    """Why the attribute name `name` is forbidden, or None."""
    if _is_dunder(name):
        return None if name in ALLOWED_DUNDER_ATTRIBUTES else f"forbidden attribute: {name}"
    if name.startswith("_") or name in FORBIDDEN_ATTRIBUTES or name in handles:
        return f"forbidden attribute: {name}"
    return None


def _forbidden_attribute_use(tree: ast.AST, forbidden_modules) -> str | None:
    """Attribute names (in `x.name`, `from m import name`, `import a.name`, `case C(name=...)`) and dunder names
    that reach the interpreter's internals; see FORBIDDEN_ATTRIBUTES and ALLOWED_DUNDER_*."""
    handles = frozenset(m.split(".")[0] for m in forbidden_modules) - _HARMLESS_MODULE_NAMES
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names if a.name != "*"] + (node.module or "").split(".")[1:]
        elif isinstance(node, ast.Import):
            names = [part for a in node.names for part in a.name.split(".")[1:]]
        elif isinstance(node, ast.MatchClass):
            names = list(node.kwd_attrs)
        elif isinstance(node, ast.Name) and _is_dunder(node.id) and node.id not in ALLOWED_DUNDER_NAMES:
            return f"forbidden name: {node.id}"
        for name in names:
            if (reason := _attribute_rule(name, handles)):
                return reason
    return None


def _import_rule(module: str, banned: set[str]) -> str | None:
    top = module.split(".")[0]
    if top in banned or (top.startswith("_") and top != "__future__"):    # private modules: _io, _imp, _thread, ...
        return f"forbidden import: {top}"
    return None


def _screen_tree(tree: ast.AST, forbidden_modules, forbidden_calls) -> str | None:
    """The rules shared by check_program and check_inputs, in order: imports, calls, attributes and names."""
    banned = set(forbidden_modules)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (r := _import_rule(alias.name, banned)):
                    return r
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                return "forbidden import: relative import"
            if (r := _import_rule(node.module or "", banned)):
                return r
            if any(a.name == "*" for a in node.names) and node.module not in _STAR_IMPORT_OK:
                return f"forbidden import: from {node.module} import *"
    try:
        return _forbidden_name_use(tree, set(forbidden_calls)) or _forbidden_attribute_use(tree, forbidden_modules)
    except RecursionError:
        return "SyntaxError: too deeply nested"


def check_program(program: str, forbidden_modules=FORBIDDEN_MODULES, forbidden_calls=FORBIDDEN_CALLS) -> str | None:
    """Static screen: None if the program is acceptable, else the reason (which rule fired), e.g.
    'forbidden import: pickle', 'forbidden call: getattr', 'forbidden attribute: __class__',
    'forbidden name: __builtins__', 'no function f'. Rules: imports of `forbidden_modules` and of private
    (`_x`) modules; star imports except from a few plain modules; the builtins in `forbidden_calls` where no
    enclosing scope binds that name; attribute names that reach interpreter internals (dunders except
    ALLOWED_DUNDER_ATTRIBUTES, private `_x` names, FORBIDDEN_ATTRIBUTES, names of forbidden modules); dunder
    names (`__builtins__`). Not the safety boundary (the OS-level confinement is), but it keeps programs
    away from `os` and from the result channel."""
    try:
        tree = ast.parse(program)
    except SyntaxError as e:
        return f"SyntaxError: {e.msg} (line {e.lineno})"
    except (ValueError, MemoryError, RecursionError) as e:  # e.g. null bytes, absurd nesting
        return f"SyntaxError: {type(e).__name__}"
    if (r := _screen_tree(tree, forbidden_modules, forbidden_calls)):
        return r
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "f" for n in tree.body):
        return "no function f"
    return None


def check_inputs(inputs: str, forbidden_calls=FORBIDDEN_CALLS, forbidden_modules=FORBIDDEN_MODULES) -> str | None:
    """Screen the argument text: `f(<inputs>)` must parse as one call of f, with the same call, attribute and
    name rules as check_program."""
    try:
        tree = ast.parse(f"f({inputs}\n)", mode="eval")
    except SyntaxError as e:
        return f"SyntaxError in inputs: {e.msg}"
    except (ValueError, MemoryError, RecursionError) as e:
        return f"SyntaxError in inputs: {type(e).__name__}"
    body = tree.body
    if not (isinstance(body, ast.Call) and isinstance(body.func, ast.Name) and body.func.id == "f"):
        return "invalid inputs"
    if any(isinstance(n, ast.NamedExpr) for n in ast.walk(tree)):
        return "invalid inputs"
    return _screen_tree(tree, forbidden_modules, forbidden_calls)


# ----------------------------------------------------------------------------------------------------------
# trusted equality


_FLOAT_NAMES = {"inf": lambda: math.inf, "nan": lambda: float("nan"), "infj": lambda: complex(0.0, math.inf),
                "nanj": lambda: complex(0.0, float("nan"))}


def _literal(node: ast.AST):
    """ast.literal_eval's rules plus set(), frozenset(<literal>) and the names inf, nan, infj, nanj (how repr
    writes them: `[inf, -inf, nan]`); never evaluates code. Each nan is a fresh float, so `nan` equals only itself
    as identical text (same_output compares texts first)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _FLOAT_NAMES:
        return _FLOAT_NAMES[node.id]()
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [_literal(e) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else (items if isinstance(node, ast.List) else set(items))
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("dict unpacking")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("set", "frozenset") \
            and not node.keywords and len(node.args) <= 1:
        arg = _literal(node.args[0]) if node.args else ()
        if not isinstance(arg, (set, frozenset, list, tuple)):
            raise ValueError("bad set literal")
        return set(arg) if node.func.id == "set" else frozenset(arg)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        if type(v) in (int, float, complex):
            return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        left, right = _literal(node.left), _literal(node.right)
        if type(left) in (int, float) and type(right) is complex:
            return left + right if isinstance(node.op, ast.Add) else left - right
    raise ValueError(f"not a literal: {type(node).__name__}")


def literal_value(text: str):
    """Parse a repr string of a plain literal (incl. set() and frozenset({...})) without evaluating code.
    Raises ValueError (or SyntaxError/RecursionError/MemoryError/TypeError) when it is not one."""
    return _literal(ast.parse(text.strip(), mode="eval").body)


def same_output(a: str | None, b: str | None, max_chars: int = 100_000) -> bool:
    """Do two repr strings denote the same value? Decided in the parent by parsing (`literal_value`, the
    ast.literal_eval rules plus set()/frozenset()), never eval.

    Both literals: Python equality, as AZR and CRUXEval; `inf` and `nan` are float literals, and as nan != nan,
    a value containing nan equals only its identical text. Otherwise (not literals, e.g. a custom repr): exact
    string equality.
    """
    if a is None or b is None:
        return False
    if a == b:
        return True
    if len(a) > max_chars or len(b) > max_chars:
        return False
    try:
        return bool(literal_value(a) == literal_value(b))
    except Exception:  # not literals, nesting too deep, unhashable set members, ...
        return False


def _is_literal_text(text) -> bool:
    """Parent-side check that a child's claimed literal really parses as one (the child is not trusted)."""
    if type(text) is not str or len(text) > 100_000:
        return False
    try:
        literal_value(text)
        return True
    except Exception:
        return False


def output_matches(result: Result, gold: str) -> bool:
    """Reward-safe check of a sandbox result against a gold output: ran ok, returned a genuine literal, and
    same_output holds. Use this for outputs of model-written programs (a custom __repr__ can forge text)."""
    return bool(result.ok and result.literal and same_output(result.output, gold))


# ----------------------------------------------------------------------------------------------------------
# the child: run f(<inputs>) and describe the value as text

_ATOMS = (type(None), bool, int, float, complex, str, bytes)
_CONTAINERS = (list, tuple, dict, set, frozenset)


class _TooBig(Exception):
    pass


def _scan(x, ancestors: set, budget: list) -> bool:
    """True iff x is a plain literal (exact types, no cycles). Raises _TooBig if its repr must exceed the cap."""
    t = type(x)
    budget[0] -= 1
    if t in _ATOMS:
        if t is str or t is bytes:
            budget[0] -= len(x)
        if budget[0] < 0:
            raise _TooBig
        return True
    if budget[0] < 0:
        raise _TooBig
    if t not in _CONTAINERS or id(x) in ancestors:
        return False
    ancestors.add(id(x))
    try:
        items = [y for kv in x.items() for y in kv] if t is dict else x
        return all(_scan(y, ancestors, budget) for y in items)
    finally:
        ancestors.discard(id(x))


def _describe(value, cap: int) -> tuple[str, bool]:
    """(repr text, is_literal) or raise _TooBig."""
    literal = _scan(value, set(), [cap])
    text = repr(value)
    if type(text) is not str:
        raise TypeError("__repr__ returned non-string")
    if len(text) > cap:
        raise _TooBig
    return text, literal


def _stdout_wrapper():
    """sys.stdout for the children (fd 1), built once in the worker (which never writes to it)."""
    import io
    return io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace")


def _child_main(job: dict, cfg: dict, result_fd: int, stdout=None) -> None:
    """Run f(<inputs>) once; write one JSON line {ok, output, literal, error} to result_fd; exit."""
    import builtins
    sys.stdout = sys.__stdout__ = stdout or _stdout_wrapper()
    sys.stderr = sys.__stderr__ = sys.stdout
    sys.stdin = sys.__stdin__ = None
    sys.setrecursionlimit(1000)
    cap = int(cfg["max_output_chars"])
    res: dict = {"ok": False, "output": None, "literal": False, "error": None}
    # Shift the heap by a random amount, so object addresses (id(), default hashes, the order of sets of
    # objects) differ between runs even when two runs are forked from the same worker state.
    pad = [[None] * k for k, r in enumerate(os.urandom(64), 1) for _ in range(r & 7)]  # noqa: F841 - kept alive
    try:
        code = compile(job["program"], "<program>", "exec")
        call = compile(f"f({job['inputs']}\n)", "<inputs>", "eval")
        ns = {"__name__": "__main__", "__builtins__": builtins}
        exec(code, ns)
        if not callable(ns.get("f")):
            raise NameError("no function f")
        output, literal = _describe(eval(call, ns), cap)
        res.update(ok=True, output=output, literal=literal)
    except MemoryError:
        res["error"] = "memory"
    except _TooBig:
        res["error"] = f"output too long (> {cap} chars)"
    except RecursionError:
        res["error"] = "RecursionError: maximum recursion depth exceeded"
    except BaseException as e:  # noqa: BLE001 - the program's failure is a result, SystemExit included
        try:
            msg = str(e)
        except BaseException:
            msg = ""
        name = type(e).__name__ if isinstance(type(e).__name__, str) else "Exception"
        res["error"] = "no function f" if msg == "no function f" else (f"{name}: {msg}" if msg else name)[:300]
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    try:
        os.write(result_fd, json.dumps(res).encode() + b"\n")
    except BaseException:
        pass
    os._exit(0)


# ----------------------------------------------------------------------------------------------------------
# the worker: a small long-lived process that forks one child per job

_RESULT_FD, _JOB_FD = 3, 4       # in the child; then confinement.RW_FD and the read-dir fds (see confinement.py)
_MAX_REPLY = 1 << 20             # bytes of a child's result line the worker reads at most
_PROBE_KEYS = ("netns", "nocaps", "landlock", "seccomp", "net_blocked")


def _kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` and the process itself (either may be gone already)."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


class _Child:
    """A pre-forked child as its worker sees it, and what its one run produced."""
    __slots__ = ("buf", "job_fd", "out_fd", "pid", "pidfd", "result_fd", "status", "timed_out", "tmpdir")

    def __init__(self, pid: int, result_fd: int, job_fd: int, out_fd: int, tmpdir: str, pidfd: int):
        self.pid, self.result_fd, self.job_fd, self.out_fd, self.tmpdir, self.pidfd = \
            pid, result_fd, job_fd, out_fd, tmpdir, pidfd
        self.buf = b""                    # the result line as read so far
        self.timed_out = False
        self.status: int | None = None    # wait status, once reaped


def _probe_network(done: dict) -> dict:
    """Start-up probe, in a confined child: can it reach the network?"""
    import socket
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("1.1.1.1", 53))
        done["net_blocked"] = False
    except OSError:
        done["net_blocked"] = True
    return done


def _child_process(server: _ForkServer, out_fd: int, result_w: int, job_r: int, tmp_fd: int, tmpdir: str) -> None:
    """The forked child: arrange its fds, confine itself, wait for its job, run it (or the probe) and exit."""
    try:
        caps = server.caps
        os.setpgid(0, 0)
        confinement.set_parent_death_signal(caps, signal.SIGKILL)
        os.dup2(server.devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.dup2(result_w, _RESULT_FD)
        os.dup2(job_r, _JOB_FD)
        os.dup2(tmp_fd, confinement.RW_FD)
        read_fds = caps["prep"]["read_fds"] if "prep" in caps else []
        for i, fd in enumerate(read_fds):
            os.dup2(fd, confinement.FIRST_READ_FD + i)
        os.closerange(confinement.FIRST_READ_FD + len(read_fds), 1 << 16)
        os.chdir(tmpdir)
        done = confinement.confine(caps)
        data = b""
        while chunk := os.read(_JOB_FD, 1 << 16):
            data += chunk
        os.close(_JOB_FD)
        job = json.loads(data)
        if job.get("probe"):
            os.write(_RESULT_FD, json.dumps(_probe_network(done)).encode() + b"\n")
            os._exit(0)
        _child_main(job, server.cfg, _RESULT_FD, server.stdout)
    finally:
        os._exit(70)


class _ForkServer:
    """The worker process: reads jobs (one JSON line each) on stdin, hands each to a child forked and confined
    ahead of time, and writes each result (one JSON line) to stdout. Stdin's EOF means stop."""

    def __init__(self, cfg: dict) -> None:
        os.environ.clear()                  # the parent already passed a minimal env; children inherit this one
        os.environ.update({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"})
        self.proto_in, self.proto_out = os.dup(0), os.dup(1)
        self.devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(self.devnull, 0)
        os.dup2(self.devnull, 1)
        self.cfg = cfg
        self.caps = confinement.prepare_worker(cfg)
        for name in PREIMPORT:
            try:
                __import__(name)
            except Exception:
                pass
        self.stdout = _stdout_wrapper()
        self.timeout = float(cfg["timeout"])
        self.current_pid = 0                # the newest child, until reaped
        self.counter = 0
        self.pending: list[int] = []        # killed children not yet reaped
        self.dirs: list[str] = []           # temp dirs to remove once their child is reaped

    def serve(self) -> None:
        """Probe the confinement, report ready, then run jobs until the parent closes our stdin."""
        probe = self.run(b'{"probe": true}\n', self.spawn(), probe=True)
        self.cleanup()
        gc.collect()
        gc.freeze()                         # children then do not touch (copy) the worker's heap on collection
        report = {k: bool(probe.get(k)) for k in _PROBE_KEYS}
        report["nodump"] = bool(self.caps.get("nodump"))
        report["landlock_abi"] = self.caps.get("landlock_abi", 0)
        os.write(self.proto_out, (json.dumps({"ready": report}) + "\n").encode())
        reader = os.fdopen(self.proto_in, "rb")
        child = self.spawn()
        for line in reader:
            try:
                res = self.run(line, child)
            except Exception as e:  # noqa: BLE001 - a broken job must not kill the worker
                res = {"ok": False, "error": f"sandbox error: {type(e).__name__}: {e}"}
            try:
                os.write(self.proto_out, (json.dumps(res) + "\n").encode())
            except OSError:                 # the parent is gone
                self.exit()
            child = self.spawn()            # the next child, while the parent handles the reply
            self.cleanup()                  # reap the previous one and remove its temp dir
        self.exit(child)

    def spawn(self) -> _Child:
        """Fork the next child now: it confines itself and waits for its job (the fork is off the critical path)."""
        self.counter += 1
        tmpdir = os.path.join(self.cfg["base_dir"], f"w{self.cfg['index']}-{self.counter}")
        os.mkdir(tmpdir, 0o700)
        out_fd = os.memfd_create("azr-out", os.MFD_CLOEXEC)
        r, w = os.pipe()           # child -> worker: the result, one JSON line
        jr, jw = os.pipe()         # worker -> child: the job
        tfd = os.open(tmpdir, os.O_PATH | os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            _child_process(self, out_fd, w, jr, tfd, tmpdir)
        os.close(w)
        os.close(jr)
        os.close(tfd)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        self.current_pid = pid
        return _Child(pid, r, jw, out_fd, tmpdir, os.pidfd_open(pid))

    def run(self, job: bytes, child: _Child, probe: bool = False) -> dict:
        """Hand the job (one JSON line from the parent, passed on unparsed) to the pre-forked child and
        collect its result within the timeout."""
        t0 = time.monotonic()
        try:
            os.write(child.job_fd, job)     # the child reads it concurrently
        except OSError:
            pass
        os.close(child.job_fd)
        self._await_result(child, t0 + (10.0 if probe else self.timeout))
        seconds = time.monotonic() - t0
        # The result is complete (or the child died or timed out): kill the child's whole process group.
        # Reaping and removing the temp dir happen after the reply is sent (off the critical path).
        _kill_group(child.pid)
        self._reap_if_finished(child)
        stdout = self._release(child)
        if child.timed_out:
            return {"ok": False, "error": "timeout", "stdout": stdout, "seconds": seconds}
        try:  # the child is untrusted: accept only the expected shape and sizes
            res = json.loads(child.buf.split(b"\n", 1)[0])
            if probe:                       # start-up probe: the child reports what confinement worked
                return {k: res.get(k) is True for k in _PROBE_KEYS}
            res = self._checked(res)
        except Exception:
            res = {"ok": False, "error": self._failure(child)}
        res.update(stdout=stdout, seconds=seconds)
        return res

    def _await_result(self, child: _Child, deadline: float) -> None:
        """Read the child's result line until it is complete, the child exits, or the deadline passes; exit the
        worker if the parent closes our stdin meanwhile (it sends nothing during a job)."""
        r, pidfd, eof = child.result_fd, child.pidfd, False
        while b"\n" not in child.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                child.timed_out = True
                return
            ready, _, _ = select.select(([] if eof else [r]) + [pidfd, self.proto_in], [], [], remaining)
            if self.proto_in in ready:
                self.exit(child)
            if r in ready:
                data = os.read(r, 1 << 16)
                if not data:
                    eof = True
                elif len(child.buf) < _MAX_REPLY:
                    child.buf += data
            if pidfd in ready:
                return

    def _reap_if_finished(self, child: _Child) -> None:
        """A child that exited by itself is reaped now and the rest of its output read; a killed one (timed out,
        or it is still tearing down after writing its result) is left for cleanup()."""
        if b"\n" not in child.buf and not child.timed_out:
            child.status = os.waitpid(child.pid, 0)[1]
            self.current_pid = 0
            os.set_blocking(child.result_fd, False)
            try:
                while len(child.buf) < _MAX_REPLY and (data := os.read(child.result_fd, 1 << 16)):
                    child.buf += data
            except OSError:
                pass
        else:
            self.pending.append(child.pid)

    def _release(self, child: _Child) -> str:
        """Close the child's fds and queue its temp dir for removal; returns its captured output (capped)."""
        os.close(child.result_fd)
        os.close(child.pidfd)
        cap = int(self.cfg["max_stdout_chars"])
        stdout = os.pread(child.out_fd, cap * 4, 0).decode("utf-8", "replace")[:cap]
        os.close(child.out_fd)
        self.dirs.append(child.tmpdir)
        return stdout

    def _checked(self, res: dict) -> dict:
        """The child's result if it has the expected shape and sizes (else AssertionError/KeyError/TypeError)."""
        out, err = res.get("output"), res.get("error")
        assert type(res["ok"]) is bool and type(res["literal"]) is bool
        assert out is None or (type(out) is str and len(out) <= int(self.cfg["max_output_chars"]))
        assert err is None or (type(err) is str and len(err) <= 300)
        return {"ok": res["ok"], "output": out, "literal": res["literal"], "error": err}

    def _failure(self, child: _Child) -> str:
        """Why a child gave no valid result, from its wait status (reaping it now if need be)."""
        status = child.status
        if status is None:
            status = os.waitpid(child.pid, 0)[1]
            self.pending.remove(child.pid)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            return "timeout" if sig == signal.SIGXCPU else f"crashed: {signal.Signals(sig).name}"
        return f"exited without result (code {os.WEXITSTATUS(status)})"

    def cleanup(self) -> None:
        """Reap killed children, then remove their temp dirs."""
        while self.pending:
            try:
                os.waitpid(self.pending.pop(), 0)
            except ChildProcessError:
                pass
        while self.dirs:
            d = self.dirs.pop()
            try:
                os.rmdir(d)
            except OSError:
                shutil.rmtree(d, ignore_errors=True)

    def exit(self, *children: _Child) -> None:
        """The parent closed our pipe (close() or it died): kill and reap every child, clean up, exit."""
        for c in children:
            self.pending.append(c.pid)
            self.dirs.append(c.tmpdir)
        for pid in self.pending + ([self.current_pid] if self.current_pid else []):
            _kill_group(pid)
        self.cleanup()
        try:                                # the last worker out removes the base dir
            os.unlink(os.path.join(self.cfg["base_dir"], f"worker-{self.cfg['index']}.log"))
            os.rmdir(self.cfg["base_dir"])
        except OSError:
            pass
        os._exit(0)


# ----------------------------------------------------------------------------------------------------------
# the parent side

_WARNED = False
_ISOLATION_KEYS = ("netns", "nocaps", "landlock", "seccomp", "net_blocked", "nodump")


class _Worker:
    def __init__(self, index: int, cfg: dict, log_dir: str):
        import subprocess
        cmd = [sys.executable, "-P", "-s", "-S", os.path.abspath(__file__), "--worker", json.dumps(cfg)]
        env = {"PYTHONHASHSEED": "0", "PYTHONUTF8": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        self.log = open(os.path.join(log_dir, f"worker-{index}.log"), "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                     cwd="/", start_new_session=True, close_fds=True)
        self.fd = self.proc.stdout.fileno()
        self.index = index
        self.buf = b""
        self.ready = False
        self.caps: dict = {}
        self.job: int | None = None
        self.deadline = time.monotonic() + 60.0     # start-up deadline, then per job

    def send(self, payload: dict) -> bool:
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def read(self) -> bool:
        """Read what is available (after select said readable); False if the worker is gone."""
        try:
            data = os.read(self.fd, 1 << 16)
        except OSError:
            data = b""
        self.buf += data
        return bool(data)

    def pop(self) -> dict | None:
        """The next complete message, if any."""
        if b"\n" not in self.buf:
            return None
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        return msg if isinstance(msg, dict) else {"ok": False, "error": "sandbox error: bad reply"}

    def kill(self) -> None:
        """Stop the worker: EOF on its stdin makes it kill its children and exit (it watches stdin even
        mid-job); SIGKILL if it still runs (its children then die by PDEATHSIG)."""
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        for fh in (self.proc.stdin, self.proc.stdout, self.log):
            try:
                fh.close()
            except (OSError, ValueError):
                pass


def _shutdown(workers: list, base_dir: str, owner: int) -> None:
    import subprocess
    if os.getpid() != owner:             # a forked copy of the owner (e.g. a data-loader): not ours to stop
        return
    for w in workers:
        try:
            w.proc.stdin.close()                           # EOF: an idle worker exits by itself
        except (OSError, ValueError):
            pass
    for w in workers:
        try:
            w.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        w.kill()
    workers.clear()
    shutil.rmtree(base_dir, ignore_errors=True)


class _JobState:
    """One job's runs within a run_many call (the parent compares them; the children are not trusted)."""
    __slots__ = ("next_rep", "done", "first", "seconds", "used")

    def __init__(self) -> None:
        self.next_rep = 0                   # runs dispatched so far
        self.done = 0                       # runs finished ok with the same (output, literal) as `first`
        self.first: Result | None = None
        self.seconds = 0.0
        self.used: dict[int, int] = {}      # worker index -> runs of this job placed there


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


class Sandbox:
    """A pool of fork-server workers; see the module docstring for what each run is confined by."""

    def __init__(self, timeout: float = 5.0, memory_mb: int = 1024, workers: int | None = None,
                 forbidden_modules=FORBIDDEN_MODULES, forbidden_calls=FORBIDDEN_CALLS, max_output_chars: int = 400,
                 max_stdout_chars: int = 4000, max_file_bytes: int = 1 << 20, screen: bool = True,
                 _disable: tuple[str, ...] = ()):
        """timeout: wall-clock seconds per run (each of the `repeats` runs has its own); memory_mb: address-space
        limit; workers: default the CPUs this process may use; max_output_chars: longer reprs give 'output too long';
        max_stdout_chars: captured stdout+stderr kept; max_file_bytes: RLIMIT_FSIZE (stdout and files); screen: run
        check_program and check_inputs first (False: OS confinement only, for tests); _disable: for tests only, OS
        features to leave off ('netns', 'landlock', 'seccomp', 'nodump').

        Waits for the workers' start-up (about 0.1 s) and warns once (RuntimeWarning) if OS-level isolation is
        degraded here."""
        import sysconfig
        import tempfile
        import threading
        import weakref
        self.timeout, self.memory_mb = float(timeout), int(memory_mb)
        self.forbidden_modules, self.forbidden_calls = tuple(forbidden_modules), tuple(forbidden_calls)
        self.screen = screen
        self._lock = threading.Lock()        # one batch at a time (callers may share a Sandbox across threads)
        self.num_workers = max(1, workers or usable_cpus())
        self.base_dir = tempfile.mkdtemp(prefix="azr-sandbox-")
        paths = sysconfig.get_paths()        # children may read only the stdlib (lazy imports) and their cwd
        read_dirs = sorted({paths["stdlib"], paths["platstdlib"], os.path.dirname(os.__file__)})
        self.cfg = {"timeout": self.timeout, "memory_mb": self.memory_mb, "max_output_chars": max_output_chars,
                    "max_stdout_chars": max_stdout_chars, "max_file_bytes": max_file_bytes,
                    "base_dir": self.base_dir, "read_dirs": read_dirs, "disable": list(_disable)}
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self.base_dir, os.getpid())
        self._next_index = 0
        try:
            for _ in range(self.num_workers):
                self._workers.append(self._spawn())
            self._run_many([], 1, wait_ready=True)      # start-up: the degraded-isolation warning comes from here
        except BaseException:
            self.close()
            raise

    def _spawn(self) -> _Worker:
        self._next_index += 1
        return _Worker(self._next_index, dict(self.cfg, index=self._next_index), self.base_dir)

    @property
    def capabilities(self) -> dict:
        """What OS-level isolation the workers achieved (waits for their start-up)."""
        with self._lock:
            self._run_many([], 1, wait_ready=True)
        return dict(self._workers[0].caps) if self._workers else {}

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = self._spawn()

    def _on_ready(self, w: _Worker, caps: dict) -> None:
        global _WARNED
        w.ready, w.caps = True, caps
        missing = [k for k in _ISOLATION_KEYS if not caps.get(k)]
        if missing and not _WARNED:
            import warnings
            _WARNED = True
            notes = []
            if "seccomp" in missing:
                notes.append("without seccomp (x86_64 only) a program can fork and RLIMIT_NPROC does not stop root")
            if "landlock" in missing:
                notes.append("without Landlock a program that escapes the screen can read and write files as this user")
            # stacklevel 5: the caller of Sandbox() (_on_ready <- _collect <- _run_many <- __init__)
            warnings.warn(f"sandbox: OS-level isolation degraded, unavailable here: {', '.join(missing)} "
                          f"(rlimits, process isolation and timeouts still apply{'; ' if notes else ''}"
                          f"{'; '.join(notes)})", RuntimeWarning, stacklevel=5)

    def run(self, program: str, inputs: str, repeats: int = 1) -> Result:
        """Run f(<inputs>) in a fresh confined process; repeats=n: n separate processes (on different workers
        where possible), ok only if all are ok with identical repr text and literal flag, else 'nondeterministic'
        (or the error of a failed run). The timeout applies to each run."""
        return self.run_many([(program, inputs)], repeats=repeats)[0]

    def run_many(self, jobs: list[tuple[str, str]], repeats: int = 1) -> list[Result]:
        """Run many (program, inputs) jobs, each `repeats` times as in run(), in parallel over the workers;
        results in the order of jobs."""
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("Sandbox is closed")
            return self._run_many(jobs, repeats)

    def _screen_job(self, program, inputs) -> str | None:
        if not isinstance(program, str) or not isinstance(inputs, str):
            return "invalid job: program and inputs must be str"
        if self.screen:
            return check_program(program, self.forbidden_modules, self.forbidden_calls) or \
                check_inputs(inputs, self.forbidden_calls, self.forbidden_modules)
        try:
            compile(program, "<program>", "exec")
            compile(f"f({inputs}\n)", "<inputs>", "eval")
        except SyntaxError as e:
            return f"SyntaxError: {e.msg} (line {e.lineno})"
        except (ValueError, MemoryError, RecursionError) as e:
            return f"SyntaxError: {type(e).__name__}"
        return None

    def _pick(self, w: _Worker, queue: deque, active: dict[int, _JobState], repeats: int) -> int | None:
        """The job whose next run worker w should take. A job's runs go to the workers it has used least (so
        two repeats land on different workers when there are two); a run that completes a job already seen ok
        once comes first, then a new job, then (only when nothing else is waiting) a speculative repeat of a
        job still on its first run."""
        def fits(st: _JobState) -> bool:
            return st.next_rep < repeats and \
                st.used.get(w.index, 0) <= min(st.used.get(x.index, 0) for x in self._workers)
        for i, st in active.items():
            if st.done and fits(st):
                return i
        if queue:
            i = queue.popleft()
            active[i] = _JobState()
            return i
        for i, st in active.items():
            if fits(st):
                return i
        return None

    def _run_many(self, jobs: list[tuple[str, str]], repeats: int, wait_ready: bool = False) -> list[Result]:
        """Screen the jobs, then until every job is decided: give each idle worker a run, wait for replies or
        deadlines, and fold each reply into its job's state. wait_ready: also wait for every worker's start-up."""
        repeats = max(1, int(repeats))
        results: list[Result | None] = [None] * len(jobs)
        queue: deque = deque()
        for i, (program, inputs) in enumerate(jobs):
            if (reason := self._screen_job(program, inputs)):
                results[i] = Result(ok=False, error=reason)
            else:
                queue.append(i)
        active: dict[int, _JobState] = {}          # started, undecided jobs
        while queue or active or any(w.job is not None for w in self._workers) or \
                (wait_ready and not all(w.ready for w in self._workers)):
            self._dispatch(jobs, queue, active, repeats)
            busy = [w for w in self._workers if w.job is not None or not w.ready]
            if busy:
                self._collect(busy, results, active, repeats)
        return results  # type: ignore[return-value]

    def _dispatch(self, jobs: list[tuple[str, str]], queue: deque, active: dict[int, _JobState], repeats: int) -> None:
        """Send each ready, idle worker its next run (see _pick); a worker that cannot take it is replaced."""
        grace = 1.0
        now = time.monotonic()
        for w in list(self._workers):
            if not w.ready or w.job is not None or (i := self._pick(w, queue, active, repeats)) is None:
                continue
            st = active[i]
            program, inputs = jobs[i]
            if w.send({"program": program, "inputs": inputs}):
                st.next_rep += 1
                st.used[w.index] = st.used.get(w.index, 0) + 1
                w.job, w.deadline = i, now + self.timeout + grace
            else:
                self._replace(w)

    def _collect(self, busy: list[_Worker], results: list, active: dict[int, _JobState], repeats: int) -> None:
        """Wait until a busy worker replies or the first deadline passes; handle its messages, deaths and
        timeouts."""
        wait = max(0.0, min(w.deadline for w in busy) - time.monotonic())
        ready, _, _ = select.select([w.fd for w in busy], [], [], wait)
        for w in busy:
            if w.fd in ready:
                alive = w.read()
                while (msg := w.pop()) is not None:
                    if not w.ready:
                        self._on_ready(w, msg.get("ready", {}))
                    elif w.job is not None:
                        self._complete(w, msg, results, active, repeats)
                if not alive:
                    self._fail(w, results, active, repeats, "sandbox worker died")
            elif time.monotonic() >= w.deadline:
                self._fail(w, results, active, repeats, "timeout" if w.ready else "sandbox worker failed to start")

    @staticmethod
    def _complete(w: _Worker, msg: dict, results: list, active: dict[int, _JobState], repeats: int) -> None:
        """One run of job w.job finished: decide the job once a run failed, two runs differ, or all agree."""
        i, w.job = w.job, None
        st = active.get(i)
        if st is None:                             # the job was already decided (a run failed or differed)
            return
        ok, output, error = msg.get("ok") is True, msg.get("output"), msg.get("error")
        stdout, seconds = msg.get("stdout", ""), msg.get("seconds", 0.0)
        stdout = stdout if type(stdout) is str else ""
        st.seconds = max(st.seconds, float(seconds) if type(seconds) in (int, float) else 0.0)
        if ok and type(output) is not str:
            ok, error = False, "sandbox error: bad reply"
        if not ok:
            error = error if type(error) is str and error else "sandbox error: no reason given"
            results[i] = Result(ok=False, error=error, stdout=stdout, seconds=st.seconds)
        else:
            run = Result(ok=True, output=output, literal=_is_literal_text(output) and msg.get("literal") is True,
                         stdout=stdout, seconds=st.seconds)
            if st.first is None:
                st.first = run
            elif (run.output, run.literal) != (st.first.output, st.first.literal):
                results[i] = Result(ok=False, error="nondeterministic", stdout=st.first.stdout, seconds=st.seconds)
            st.done += 1
            if results[i] is None and st.done == repeats:
                results[i] = Result(ok=True, output=st.first.output, literal=st.first.literal,
                                    stdout=st.first.stdout, seconds=st.seconds)
        if results[i] is not None:
            del active[i]

    def _fail(self, w: _Worker, results: list, active: dict[int, _JobState], repeats: int, error: str) -> None:
        if w.job is not None:
            self._complete(w, {"ok": False, "error": error}, results, active, repeats)
        elif not w.ready and error != "timeout":
            self._replace(w)
            raise RuntimeError(f"{error}; see {w.log.name}")
        self._replace(w)

    def close(self) -> None:
        """Stop all workers (killing any running child) and remove the temp dirs."""
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _ForkServer(json.loads(sys.argv[2])).serve()
