"""Fast, isolated execution of model-written Python: AZR's judge.

Every reward in AZR comes from running code the model wrote, so this module must be right, safe against
hostile and reward-hacking programs, and fast. Two layers:

1. `check_program` / `check_inputs`: a static `ast` screen (no `f`, forbidden imports, forbidden builtin
   calls, scope-aware so a parameter named `input` is fine). It gives task validity its reasons; it is *not*
   the safety boundary.
2. `Sandbox`: each program runs in its own fresh process, forked from a pre-warmed worker ("fork server").
   Workers are small `python -P -s -S` processes started with an explicit minimal env (never forks of the
   caller, which may hold torch threads); they talk to the parent over pipes, and each keeps one child
   forked and confined ahead of time, so a job costs one pipe write. Each child gets rlimits (CPU, address
   space, processes, file size, open files, no core), a wall-clock kill of its process group, a private temp
   cwd (removed afterwards), stdin on /dev/null, stdout/stderr captured and capped, and on Linux: a private
   empty network namespace (per worker), no capabilities, no_new_privs, Landlock (reads only under the
   Python stdlib and its temp dir, writes only in its temp dir, no TCP, no signals or abstract unix sockets
   outside its domain) and a seccomp filter (x86_64: no sockets, no fork/clone/exec, no ptrace, signals
   only to itself, no raising rlimits, no chmod/chown/xattr/mount/namespaces/SysV IPC/...). Missing OS
   features are detected at start-up (a probe child) and reported by one RuntimeWarning.

`repeats=n` runs f n times in the same child, each time re-executing the program in a fresh namespace and
re-evaluating the inputs; the result is ok only if all reprs are equal (else 'nondeterministic'). The
timeout covers all repeats together. PYTHONHASHSEED is fixed, so set orders agree across workers and runs.

The child sends back only text: the repr of the return value and whether the value was a plain literal
(None/bool/int/float/complex/str/bytes/list/tuple/dict/set/frozenset, recursively, exact types, no
cycles); the parent re-checks that the text parses as a literal (`literal_value`). Outputs are compared in
the trusted parent by `same_output` (ast-based, never eval), so an object whose `__eq__` is always True
gains nothing. A custom object whose `__repr__` returns the gold text does yield that text, with
`literal=False`: rewards should use `output_matches` (ok and literal and same_output) for outputs of
model-written code. Limitation: a program that reaches `os` can write its own result line, so it can fake
what it "returned" (including passing the repeats check), though it cannot affect anything outside itself.
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
from dataclasses import dataclass

FORBIDDEN_MODULES: tuple[str, ...] = (
    # AZR's list
    "logging", "random", "multiprocessing", "pebble", "subprocess", "threading", "datetime", "time",
    "hashlib", "hmac", "bcrypt", "calendar",
    # ours: escape hatches to the OS or the interpreter
    "os", "sys", "shutil", "socket", "signal", "ctypes", "importlib", "pathlib", "io", "builtins",
)
FORBIDDEN_CALLS: tuple[str, ...] = (
    "__import__", "open", "exec", "eval", "compile", "input", "breakpoint", "globals",
)
# Modules imported once by every worker, so programs that use them pay nothing per run.
PREIMPORT: tuple[str, ...] = (
    "collections", "collections.abc", "itertools", "functools", "math", "cmath", "re", "string", "heapq",
    "bisect", "operator", "copy", "json", "fractions", "decimal", "typing", "dataclasses",
    "enum", "textwrap", "unicodedata", "array", "numbers", "struct", "base64", "binascii", "difflib",
    "pprint", "keyword", "abc", "types", "contextlib", "reprlib", "codecs", "zlib", "weakref",
)


@dataclass
class Result:
    ok: bool                      # program ran and f(<inputs>) returned (on every repeat, identically)
    output: str | None = None     # repr() of the return value (at most max_output_chars, else an error)
    error: str | None = None      # short reason when not ok: 'timeout', 'memory', 'forbidden import: os', ...
    literal: bool = False         # the returned value was a plain literal (see module doc); False if not ok
    stdout: str = ""              # captured stdout+stderr of the child (capped)
    seconds: float = 0.0          # wall time of the child as measured by its worker


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
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.MatchAs) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.MatchStar) and node.name:
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


def check_program(program: str, forbidden_modules=FORBIDDEN_MODULES, forbidden_calls=FORBIDDEN_CALLS) -> str | None:
    """Static screen: None if the program is acceptable, else the reason (which rule fired)."""
    try:
        tree = ast.parse(program)
    except SyntaxError as e:
        return f"SyntaxError: {e.msg} (line {e.lineno})"
    except (ValueError, MemoryError, RecursionError) as e:  # e.g. null bytes, absurd nesting
        return f"SyntaxError: {type(e).__name__}"
    banned = set(forbidden_modules)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in banned:
                    return f"forbidden import: {alias.name.split('.')[0]}"
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                return "forbidden import: relative import"
            if (node.module or "").split(".")[0] in banned:
                return f"forbidden import: {node.module.split('.')[0]}"
    if (r := _forbidden_name_use(tree, set(forbidden_calls))):
        return r
    if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "f" for n in tree.body):
        return "no function f"
    return None


def check_inputs(inputs: str, forbidden_calls=FORBIDDEN_CALLS) -> str | None:
    """Screen the argument text: `f(<inputs>)` must parse as one call of f with forbidden builtins unused."""
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
    return _forbidden_name_use(tree, set(forbidden_calls))


# ----------------------------------------------------------------------------------------------------------
# trusted equality


def _literal(node: ast.AST):
    """ast.literal_eval's rules plus set() and frozenset(<literal>) (how repr writes them); never evaluates code."""
    if isinstance(node, ast.Constant):
        return node.value
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


def _canon(v):
    """Type-tagged hashable form of a literal, for strict comparison."""
    t = type(v)
    if t in (list, tuple):
        return (t.__name__, tuple(_canon(x) for x in v))
    if t in (set, frozenset):
        return (t.__name__, frozenset(_canon(x) for x in v))
    if t is dict:
        return ("dict", frozenset((_canon(k), _canon(x)) for k, x in v.items()))
    return (t.__name__, v)


def same_output(a: str | None, b: str | None, strict: bool = False, max_chars: int = 100_000) -> bool:
    """Do two repr strings denote the same value? Decided in the parent by parsing (`literal_value`, the
    ast.literal_eval rules plus set()/frozenset()), never eval.

    Both literals: Python equality, as AZR and CRUXEval (`strict=True` also requires identical types, so
    `1` != `True` != `1.0`). Otherwise (not literals, e.g. `nan` or a custom repr): exact string equality.
    """
    if a is None or b is None:
        return False
    if a == b:
        return True
    if len(a) > max_chars or len(b) > max_chars:
        return False
    try:
        va, vb = literal_value(a), literal_value(b)
        return _canon(va) == _canon(vb) if strict else bool(va == vb)
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


def output_matches(result: Result, gold: str, strict: bool = False) -> bool:
    """Reward-safe check of a sandbox result against a gold output: ran ok, returned a genuine literal, and
    same_output holds. Use this for outputs of model-written programs (a custom __repr__ can forge text)."""
    return bool(result.ok and result.literal and same_output(result.output, gold, strict=strict))


# ----------------------------------------------------------------------------------------------------------
# OS-level confinement (runs inside the worker and its children; Linux only, degrades elsewhere)

_SYS = {"landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446}  # all arches
_DENY_X86_64 = (  # x86_64 syscall numbers (the seccomp filter is x86_64 only; elsewhere: one warning)
    41, 42, 43, 49, 50, 53, 288,                      # socket connect accept bind listen socketpair accept4
    56, 57, 58, 59, 322, 435,                         # clone fork vfork execve execveat clone3
    101, 310, 311, 424, 434, 438,                     # ptrace process_vm_readv/writev pidfd_*
    160,                                              # setrlimit
    105, 106, 113, 114, 116, 117, 119, 122, 123, 126,  # set*id setgroups capset
    157, 135,                                         # prctl personality
    90, 91, 92, 93, 94, 260, 268, 452, 132, 235, 261, 280,  # chmod/chown/utime family
    188, 189, 190, 197, 198, 199, 133, 259,           # xattrs mknod
    165, 166, 155, 161, 167, 168, 169, 170, 171, 172, 173, 175, 176, 313, 179, 163, 103, 246, 320,
    272, 308, 321, 298, 323, 425, 426, 427, 248, 249, 250, 303, 304, 428, 429, 430, 431, 432, 433, 442,
    212, 153, 164, 227, 159, 305,                     # misc privileged
    29, 30, 31, 64, 65, 66, 67, 68, 69, 70, 71, 220,  # SysV IPC
    240, 241, 242, 243, 244, 245,                     # POSIX message queues
    141, 142, 144, 203, 251, 256, 279,                # setpriority sched_* ioprio migrate/move_pages
)
_EPERM = 0x00050000 | 1
_ALLOW = 0x7FFF0000
_KILL = 0x80000000


def _libc():
    import ctypes
    return ctypes, ctypes.CDLL(None, use_errno=True)


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    import struct
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


_BPF_LD, _BPF_JEQ, _BPF_JGE, _BPF_RET = 0x20, 0x15, 0x35, 0x06


def _seccomp_tree(ranges: list[tuple[int, bytes]]) -> bytes:
    """Binary search over syscall-number ranges (short filters: cheap to attach and to run)."""
    if len(ranges) == 1:
        return ranges[0][1]
    mid = len(ranges) // 2
    left, right = _seccomp_tree(ranges[:mid]), _seccomp_tree(ranges[mid:])
    if len(left) // 8 > 255:
        raise ValueError("seccomp filter too large")
    return _bpf(_BPF_JGE, len(left) // 8, 0, ranges[mid][0]) + left + right


_SECCOMP_CACHE: dict = {}


def _seccomp_program(pid: int) -> bytes:
    """Deny-list filter (EPERM); signals only to ourselves; prlimit64 only to read limits."""
    allow, deny = _bpf(_BPF_RET, 0, 0, _ALLOW), _bpf(_BPF_RET, 0, 0, _EPERM)
    actions: dict[int, bytes] = {nr: deny for nr in _DENY_X86_64}
    own = sorted({pid, 0, -pid})
    for nr in (62, 200, 234, 129, 297):                   # kill tkill tgkill rt_sigqueueinfo rt_tgsigqueueinfo
        block = _bpf(_BPF_LD, 0, 0, 16)                   # args[0], low 32 bits
        for v in (own if nr in (62, 129) else [pid]):
            block += _bpf(_BPF_JEQ, 0, 1, v) + allow
        actions[nr] = block + deny
    actions[302] = (_bpf(_BPF_LD, 0, 0, 32) + _bpf(_BPF_JEQ, 0, 3, 0) + _bpf(_BPF_LD, 0, 0, 36)
                    + _bpf(_BPF_JEQ, 0, 1, 0) + allow + deny)       # prlimit64 with new_limit == NULL
    ranges: list[tuple[int, bytes]] = [(0, allow)]
    for nr in range(0, max(actions) + 2):
        act = actions.get(nr, allow)
        if act != ranges[-1][1] or act not in (allow, deny):
            ranges.append((nr, act))
    if ranges[0][0] == ranges[1][0]:
        ranges.pop(0)
    head = (_bpf(_BPF_LD, 0, 0, 4) + _bpf(_BPF_JEQ, 1, 0, 0xC000003E) + _bpf(_BPF_RET, 0, 0, _KILL)
            + _bpf(_BPF_LD, 0, 0, 0) + _bpf(_BPF_JGE, 0, 1, 0x40000000) + deny)
    return head + _seccomp_tree(ranges)


_TEMPLATE_PID = 0x3FFFFFF1   # never a real pid (pid_max <= 2**22)


def _seccomp_for(pid: int) -> bytes:
    """_seccomp_program(pid), from a cached template by patching the pid constants (fast in the child)."""
    import struct
    if "template" not in _SECCOMP_CACHE:
        prog = _seccomp_program(_TEMPLATE_PID)
        a, b = struct.pack("I", _TEMPLATE_PID), struct.pack("I", -_TEMPLATE_PID & 0xFFFFFFFF)
        _SECCOMP_CACHE["template"] = (prog, a, b, prog.count(a), prog.count(b))
    prog, a, b, na, nb = _SECCOMP_CACHE["template"]
    out = prog.replace(a, struct.pack("I", pid)).replace(b, struct.pack("I", -pid & 0xFFFFFFFF))
    if out.count(struct.pack("I", pid)) < na or len(out) != len(prog):
        return _seccomp_program(pid)
    return out


def _install_seccomp(ctypes, libc, pid: int) -> bool:
    if "fprog" not in _SECCOMP_CACHE:
        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        _SECCOMP_CACHE["fprog"] = SockFprog
    prog = _seccomp_for(pid)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SECCOMP_CACHE["fprog"](len(prog) // 8, ctypes.addressof(buf))
    return libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0      # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _landlock_abi(ctypes, libc) -> int:
    v = libc.syscall(_SYS["landlock_create_ruleset"], None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(v, 0)


_FIRST_READ_FD = 5   # child fd layout: 0 /dev/null, 1-2 output, 3 result, 4 job, 5.. O_PATH fds of read_dirs


def _prepare_confinement(ctypes, libc, abi: int, read_dirs: list[str]) -> dict:
    """Worker start-up: build every ctypes object the children need, so each child only makes the calls
    (fewer copy-on-write page faults per child, which is most of a fork's cost)."""
    import struct
    for name in ("prctl", "syscall", "capset"):
        getattr(libc, name)                                     # cache the function pointers
    prep: dict = {"cap_hdr": (ctypes.c_uint32 * 2)(0x20080522, 0), "cap_data": (ctypes.c_uint32 * 6)(),
                  "read_fds": [], "read_rules": []}
    if abi > 0:
        fs_bits = {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)
        handled_fs = (1 << fs_bits) - 1
        read = (1 << 2) | (1 << 3)                              # READ_FILE | READ_DIR
        prep["rw_access"] = handled_fs & ~1                     # everything but EXECUTE
        if abi >= 6:
            attr = struct.pack("QQQ", handled_fs, 3, 3)         # net: BIND|CONNECT TCP; scope: abstract unix|signal
        elif abi >= 4:
            attr = struct.pack("QQ", handled_fs, 3)
        else:
            attr = struct.pack("Q", handled_fs)
        prep["attr"] = ctypes.create_string_buffer(attr, len(attr))
        for d in read_dirs:
            try:
                fd = os.open(d, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            target = _FIRST_READ_FD + len(prep["read_fds"])
            prep["read_fds"].append(fd)
            prep["read_rules"].append(ctypes.create_string_buffer(struct.pack("=Qi", read, target), 12))
        prep["args"] = (ctypes.c_size_t(len(attr)), ctypes.c_uint32(0), ctypes.c_int(1))
    return prep


def _install_landlock(ctypes, libc, prep: dict, rw_dir: str) -> bool:
    """In the child: reads only under the prepared read dirs (fds 5..), everything but exec in rw_dir."""
    import struct
    size, zero, path_beneath = prep["args"]
    fd = libc.syscall(_SYS["landlock_create_ruleset"], prep["attr"], size, zero)
    if fd < 0:
        return False
    try:
        for rule in prep["read_rules"]:
            libc.syscall(_SYS["landlock_add_rule"], fd, path_beneath, rule, zero)
        pfd = os.open(rw_dir, os.O_PATH | os.O_CLOEXEC)
        rule = ctypes.create_string_buffer(struct.pack("=Qi", prep["rw_access"], pfd), 12)
        ok = libc.syscall(_SYS["landlock_add_rule"], fd, path_beneath, rule, zero) == 0
        os.close(pfd)
        return ok and libc.syscall(_SYS["landlock_restrict_self"], fd, zero) == 0
    finally:
        os.close(fd)
        os.closerange(_FIRST_READ_FD, _FIRST_READ_FD + len(prep["read_fds"]))


def _drop_capabilities(libc, prep: dict) -> bool:
    return libc.capset(prep["cap_hdr"], prep["cap_data"]) == 0     # _LINUX_CAPABILITY_VERSION_3, all zero


def _unshare_network(ctypes, libc) -> bool:
    """Worker start-up: a private, empty network namespace (as root directly, else inside a user namespace)."""
    if libc.unshare(0x40000000) == 0:                          # CLONE_NEWNET
        return True
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000 | 0x40000000) != 0:             # CLONE_NEWUSER | CLONE_NEWNET
        return False
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
    except OSError:
        pass
    return True


def _confine(cfg: dict, tmpdir: str, caps: dict) -> dict:
    """In the child: rlimits, then capabilities, Landlock, seccomp as available. Returns what worked."""
    import resource
    mem = int(cfg["memory_mb"]) << 20
    cpu = int(math.ceil(cfg["timeout"])) + 1
    for res, lim in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_NPROC, 0),
                     (resource.RLIMIT_FSIZE, int(cfg["max_file_bytes"])), (resource.RLIMIT_NOFILE, 64),
                     (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(res, (lim, lim + (1 if res == resource.RLIMIT_CPU else 0)))
        except (ValueError, OSError):
            pass
    done = {"netns": caps.get("netns", False)}
    if sys.platform != "linux" or "prep" not in caps:
        return done
    ctypes, libc = caps["_libc"]
    prep = caps["prep"]
    done["nocaps"] = _drop_capabilities(libc, prep)
    libc.prctl(38, 1, 0, 0, 0)                                 # PR_SET_NO_NEW_PRIVS
    done["landlock"] = caps.get("landlock_abi", 0) > 0 and _install_landlock(ctypes, libc, prep, tmpdir)
    done["seccomp"] = os.uname().machine == "x86_64" and _install_seccomp(ctypes, libc, os.getpid())
    return done


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


def _child_main(job: dict, cfg: dict, result_fd: int) -> None:
    import builtins
    import io
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                                  errors="backslashreplace")
    sys.stderr = sys.__stderr__ = sys.stdout
    sys.stdin = sys.__stdin__ = None
    sys.setrecursionlimit(1000)
    cap = int(cfg["max_output_chars"])
    res: dict = {"ok": False, "output": None, "literal": False, "error": None}
    try:
        code = compile(job["program"], "<program>", "exec")
        call = compile(f"f({job['inputs']}\n)", "<inputs>", "eval")
        seen = None
        for _ in range(max(1, int(job.get("repeats", 1)))):
            ns = {"__name__": "__main__", "__builtins__": builtins}
            exec(code, ns)
            if not callable(ns.get("f")):
                raise NameError("no function f")
            described = _describe(eval(call, ns), cap)
            if seen is not None and described != seen:
                res["error"] = "nondeterministic"
                break
            seen = described
        else:
            res.update(ok=True, output=seen[0], literal=seen[1])
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


def _worker_main(cfg: dict) -> None:
    os.environ.clear()                      # the parent already passed a minimal env; children inherit this one
    os.environ.update({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"})
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    caps: dict = {"netns": False, "landlock_abi": 0}
    if sys.platform == "linux":
        try:
            ctypes, libc = _libc()
            caps["_libc"] = (ctypes, libc)
            caps["netns"] = _unshare_network(ctypes, libc)
            caps["landlock_abi"] = _landlock_abi(ctypes, libc)
            caps["prep"] = _prepare_confinement(ctypes, libc, caps["landlock_abi"], cfg["read_dirs"])
        except Exception:
            caps.pop("_libc", None)
    for name in tuple(cfg.get("preimport", PREIMPORT)) + ("resource",):
        try:
            __import__(name)
        except Exception:
            pass
    if "_libc" in caps:
        _seccomp_for(os.getpid())          # build the filter template once
    current = {"pid": 0}
    counter = 0
    pending: list[int] = []      # killed children not yet reaped
    dirs: list[str] = []         # temp dirs to remove once their child is reaped

    def spawn() -> dict:
        """Fork the next child now: it confines itself and waits for its job (the fork is off the critical path)."""
        nonlocal counter
        counter += 1
        tmpdir = os.path.join(cfg["base_dir"], f"w{cfg['index']}-{counter}")
        os.mkdir(tmpdir, 0o700)
        out_fd = os.memfd_create("azr-out", os.MFD_CLOEXEC) if hasattr(os, "memfd_create") else \
            os.open(tmpdir, os.O_TMPFILE | os.O_RDWR, 0o600)
        r, w = os.pipe()           # child -> worker: the result, one JSON line
        jr, jw = os.pipe()         # worker -> child: the job
        pid = os.fork()
        if pid == 0:  # ---- child
            try:
                os.setpgid(0, 0)
                if "_libc" in caps:
                    caps["_libc"][1].prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG
                os.dup2(devnull, 0)
                os.dup2(out_fd, 1)
                os.dup2(out_fd, 2)
                os.dup2(w, 3)
                os.dup2(jr, 4)
                read_fds = caps["prep"]["read_fds"] if "prep" in caps else []
                for i, fd in enumerate(read_fds):
                    os.dup2(fd, _FIRST_READ_FD + i)
                os.closerange(_FIRST_READ_FD + len(read_fds), 1 << 16)
                os.chdir(tmpdir)
                done = _confine(cfg, tmpdir, caps)
                data = b""
                while chunk := os.read(4, 1 << 16):
                    data += chunk
                os.close(4)
                job = json.loads(data)
                if job.get("probe"):
                    import socket
                    try:
                        socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("1.1.1.1", 53))
                        done["net_blocked"] = False
                    except OSError:
                        done["net_blocked"] = True
                    os.write(3, json.dumps(done).encode() + b"\n")
                    os._exit(0)
                _child_main(job, cfg, 3)
            finally:
                os._exit(70)
        # ---- worker
        os.close(w)
        os.close(jr)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        current["pid"] = pid
        pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
        return {"pid": pid, "r": r, "jw": jw, "out_fd": out_fd, "tmpdir": tmpdir, "pidfd": pidfd}

    def run(job: dict, child: dict) -> dict:
        pid, r, out_fd, tmpdir, pidfd = child["pid"], child["r"], child["out_fd"], child["tmpdir"], child["pidfd"]
        t0 = time.monotonic()
        try:
            os.write(child["jw"], json.dumps(job).encode())   # the child reads it concurrently
        except OSError:
            pass
        os.close(child["jw"])
        deadline = t0 + float(job["timeout"])
        buf, eof, timed_out, exited, polled = b"", False, False, False, 0
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            watch = ([] if eof else [r]) + ([pidfd] if pidfd is not None else []) + [proto_in]
            if pidfd is None:  # no pidfd support: poll for the child's exit
                done_pid, polled = os.waitpid(pid, os.WNOHANG)
                if done_pid:
                    exited = True
                    break
                remaining = min(remaining, 0.005)
            ready, _, _ = select.select(watch, [], [], remaining)
            if proto_in in ready:              # the parent sends nothing during a job: this is EOF
                exit_worker(child)
            if r in ready:
                data = os.read(r, 1 << 16)
                if not data:
                    eof = True
                elif len(buf) < (1 << 20):
                    buf += data
            if pidfd is not None and pidfd in ready:
                break
        seconds = time.monotonic() - t0
        # The result is complete (or the child died or timed out): kill the child's whole process group.
        # Reaping and removing the temp dir happen after the reply is sent (off the critical path).
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
        status = None
        if exited or (pidfd is not None and b"\n" not in buf and not timed_out):
            status = polled if exited else os.waitpid(pid, 0)[1]
            current["pid"] = 0
            os.set_blocking(r, False)
            try:
                while len(buf) < (1 << 20) and (data := os.read(r, 1 << 16)):
                    buf += data
            except OSError:
                pass
        else:
            pending.append(pid)
        for fd in (r, pidfd):
            if fd is not None:
                os.close(fd)
        cap = int(cfg["max_stdout_chars"])
        stdout = os.pread(out_fd, cap * 4, 0).decode("utf-8", "replace")[:cap]
        os.close(out_fd)
        dirs.append(tmpdir)
        if timed_out:
            return {"ok": False, "error": "timeout", "stdout": stdout, "seconds": seconds}
        try:  # the child is untrusted: accept only the expected shape and sizes
            res = json.loads(buf.split(b"\n", 1)[0])
            if job.get("probe"):           # start-up probe: the child reports what confinement worked
                return {k: res.get(k) is True for k in ("netns", "nocaps", "landlock", "seccomp", "net_blocked")}
            out, err = res.get("output"), res.get("error")
            assert type(res["ok"]) is bool and type(res["literal"]) is bool
            assert out is None or (type(out) is str and len(out) <= int(cfg["max_output_chars"]))
            assert err is None or (type(err) is str and len(err) <= 300)
            res = {"ok": res["ok"], "output": out, "literal": res["literal"], "error": err}
        except Exception:
            if status is None:
                status = os.waitpid(pid, 0)[1]
                pending.remove(pid)
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                err = "timeout" if sig == signal.SIGXCPU else f"crashed: {signal.Signals(sig).name}"
            else:
                err = f"exited without result (code {os.WEXITSTATUS(status)})"
            res = {"ok": False, "error": err}
        res.update(stdout=stdout, seconds=seconds)
        return res

    def cleanup() -> None:
        """Reap killed children, then remove their temp dirs."""
        while pending:
            try:
                os.waitpid(pending.pop(), 0)
            except ChildProcessError:
                pass
        while dirs:
            d = dirs.pop()
            try:
                os.rmdir(d)
            except OSError:
                shutil.rmtree(d, ignore_errors=True)

    def exit_worker(*children: dict) -> None:
        """The parent closed our pipe (close() or it died): kill and reap every child, clean up, exit."""
        for c in children:
            pending.append(c["pid"])
            dirs.append(c["tmpdir"])
        for pid in pending + ([current["pid"]] if current["pid"] else []):
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        cleanup()
        try:                               # the last worker out removes the base dir
            os.unlink(os.path.join(cfg["base_dir"], f"worker-{cfg['index']}.log"))
            os.rmdir(cfg["base_dir"])
        except OSError:
            pass
        os._exit(0)

    probe = run({"probe": True, "timeout": 10.0}, spawn())
    cleanup()
    gc.collect()
    gc.freeze()                            # children then do not touch (copy) the worker's heap on collection
    caps_report = {k: bool(probe.get(k)) for k in ("netns", "nocaps", "landlock", "seccomp", "net_blocked")}
    caps_report["landlock_abi"] = caps.get("landlock_abi", 0)
    os.write(proto_out, (json.dumps({"ready": caps_report}) + "\n").encode())
    reader = os.fdopen(proto_in, "rb")
    child = spawn()
    for line in reader:
        try:
            res = run(json.loads(line), child)
        except Exception as e:  # noqa: BLE001 - a broken job must not kill the worker
            res = {"ok": False, "error": f"sandbox error: {type(e).__name__}: {e}"}
        try:
            os.write(proto_out, (json.dumps(res) + "\n").encode())
        except OSError:                    # the parent is gone
            exit_worker()
        child = spawn()                    # the next child, while the parent handles the reply
        cleanup()                          # reap the previous one and remove its temp dir
    exit_worker(child)


# ----------------------------------------------------------------------------------------------------------
# the parent side

_WARNED = False


class _Worker:
    def __init__(self, index: int, cfg: dict, log_dir: str):
        import subprocess
        cmd = [sys.executable, "-P", "-s", "-S", os.path.abspath(__file__), "--worker", json.dumps(cfg)]
        env = {"PYTHONHASHSEED": "0", "PYTHONUTF8": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        self.log = open(os.path.join(log_dir, f"worker-{index}.log"), "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
                                     cwd="/", start_new_session=True, close_fds=True)
        self.fd = self.proc.stdout.fileno()
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

    def kill(self, grace: float = 0.0) -> None:
        """Stop the worker: EOF on its stdin makes it kill its children and exit (it watches stdin even
        mid-job); after `grace` seconds SIGKILL (its children then die by PDEATHSIG)."""
        import subprocess
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        if grace > 0:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
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


class Sandbox:
    """A pool of fork-server workers; see the module docstring for what each run is confined by."""

    def __init__(self, timeout: float = 5.0, memory_mb: int = 1024, workers: int | None = None,
                 forbidden_modules=FORBIDDEN_MODULES, forbidden_calls=FORBIDDEN_CALLS, max_output_chars: int = 400,
                 max_stdout_chars: int = 4000, max_file_bytes: int = 1 << 20, screen: bool = True,
                 preimport: tuple[str, ...] = PREIMPORT):
        """timeout: wall-clock seconds per job (all repeats); memory_mb: address-space limit; workers: default
        os.cpu_count(); max_output_chars: longer reprs give 'output too long'; max_stdout_chars: captured
        stdout+stderr kept; max_file_bytes: RLIMIT_FSIZE (stdout and files); screen: run check_program and
        check_inputs first (False: OS confinement only, for tests); preimport: modules each worker loads once."""
        import sysconfig
        import tempfile
        import threading
        import weakref
        self.timeout, self.memory_mb = float(timeout), int(memory_mb)
        self.forbidden_modules, self.forbidden_calls = tuple(forbidden_modules), tuple(forbidden_calls)
        self.screen = screen
        self._lock = threading.Lock()        # one batch at a time (callers may share a Sandbox across threads)
        self.num_workers = max(1, workers or os.cpu_count() or 1)
        self.base_dir = tempfile.mkdtemp(prefix="azr-sandbox-")
        paths = sysconfig.get_paths()        # children may read only the stdlib (lazy imports) and their cwd
        read_dirs = sorted({paths["stdlib"], paths["platstdlib"], os.path.dirname(os.__file__)})
        self.cfg = {"timeout": self.timeout, "memory_mb": self.memory_mb, "max_output_chars": max_output_chars,
                    "max_stdout_chars": max_stdout_chars, "max_file_bytes": max_file_bytes,
                    "base_dir": self.base_dir, "read_dirs": read_dirs, "preimport": list(preimport)}
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self.base_dir, os.getpid())
        self._next_index = 0
        for _ in range(self.num_workers):
            self._workers.append(self._spawn())

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
        missing = [k for k in ("netns", "nocaps", "landlock", "seccomp", "net_blocked") if not caps.get(k)]
        if missing and not _WARNED:
            import warnings
            _WARNED = True
            warnings.warn(f"sandbox: OS-level isolation degraded, unavailable here: {', '.join(missing)} "
                          "(rlimits, process isolation and timeouts still apply)", RuntimeWarning, stacklevel=3)

    def run(self, program: str, inputs: str, repeats: int = 1) -> Result:
        """Run f(<inputs>) in a fresh confined process (repeats>1: all runs must give the same repr;
        the timeout covers all repeats)."""
        return self.run_many([(program, inputs)], repeats=repeats)[0]

    def run_many(self, jobs: list[tuple[str, str]], repeats: int = 1) -> list[Result]:
        """Run many (program, inputs) jobs in parallel over the workers; results in the order of jobs."""
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("Sandbox is closed")
            return self._run_many(jobs, repeats)

    def _run_many(self, jobs: list[tuple[str, str]], repeats: int, wait_ready: bool = False) -> list[Result]:
        results: list[Result | None] = [None] * len(jobs)
        pending: list[int] = []
        for i, (program, inputs) in enumerate(jobs):
            reason = None
            if not isinstance(program, str) or not isinstance(inputs, str):
                reason = "invalid job: program and inputs must be str"
            elif self.screen:
                reason = check_program(program, self.forbidden_modules, self.forbidden_calls) or \
                    check_inputs(inputs, self.forbidden_calls)
            else:
                try:
                    compile(program, "<program>", "exec")
                    compile(f"f({inputs}\n)", "<inputs>", "eval")
                except SyntaxError as e:
                    reason = f"SyntaxError: {e.msg} (line {e.lineno})"
                except (ValueError, MemoryError, RecursionError) as e:
                    reason = f"SyntaxError: {type(e).__name__}"
            if reason:
                results[i] = Result(ok=False, error=reason)
            else:
                pending.append(i)
        pending.reverse()
        grace = 1.0
        while pending or any(w.job is not None for w in self._workers) or \
                (wait_ready and not all(w.ready for w in self._workers)):
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.job is None and pending:
                    i = pending.pop()
                    program, inputs = jobs[i]
                    if w.send({"program": program, "inputs": inputs, "repeats": repeats, "timeout": self.timeout}):
                        w.job, w.deadline = i, now + self.timeout + grace
                    else:
                        pending.append(i)
                        self._replace(w)
            busy = [w for w in self._workers if w.job is not None or not w.ready]
            if not busy:
                continue
            wait = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready, _, _ = select.select([w.fd for w in busy], [], [], wait)
            for w in busy:
                if w.fd in ready:
                    alive = w.read()
                    while (msg := w.pop()) is not None:
                        if not w.ready:
                            self._on_ready(w, msg.get("ready", {}))
                        elif w.job is not None:
                            output = msg.get("output")
                            results[w.job] = Result(ok=bool(msg.get("ok")), output=output,
                                                    error=msg.get("error"), literal=_is_literal_text(output)
                                                    and bool(msg.get("literal")),
                                                    stdout=msg.get("stdout", ""), seconds=msg.get("seconds", 0.0))
                            w.job = None
                    if not alive:
                        self._fail(w, results, "sandbox worker died")
                elif time.monotonic() >= w.deadline:
                    self._fail(w, results, "timeout" if w.ready else "sandbox worker failed to start")
        return results  # type: ignore[return-value]

    def _fail(self, w: _Worker, results: list, error: str) -> None:
        if w.job is not None:
            results[w.job] = Result(ok=False, error=error)
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
    _worker_main(json.loads(sys.argv[2]))
