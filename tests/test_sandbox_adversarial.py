"""Hostile programs: containment (files, network, processes, signals, time, memory) and reward hacks.

The static screen rejects `import os` and the known routes around it (the builtins object, introspection),
but it is not the safety boundary, so most tests run with the screen off (`raw`) and check that the OS-level
confinement holds on its own. Each test asserts on the real system (the filesystem, a listening socket,
/proc), not only on the Result.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox import Sandbox, output_matches, same_output  # noqa: E402

TIMEOUT = 1.0
LIMIT = TIMEOUT + 1.0 + 0.5          # contract: a Result within timeout + 1 s (+ scheduling slack)
# Reach os without `import`: through the builtins object, or through introspection (the screen rejects both).
OS = "__builtins__.__dict__['__imp' + 'ort__']('o' + 's')"
INTROSPECT_OS = ("[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]"
                 ".__init__.__globals__")


@pytest.fixture(scope="module")
def sb():
    with Sandbox(timeout=TIMEOUT, memory_mb=256, workers=2) as box:
        box.capabilities
        yield box


@pytest.fixture(scope="module")
def raw():
    """No static screen at all: plain `import os` reaches the OS layer directly."""
    with Sandbox(timeout=TIMEOUT, memory_mb=256, workers=2, screen=False) as box:
        caps = box.capabilities
        if sys.platform == "linux" and os.uname().machine == "x86_64" and os.geteuid() == 0:
            assert all(caps[k] for k in ("netns", "nocaps", "seccomp", "net_blocked")), caps
            assert caps["landlock"] or not caps["landlock_abi"], caps
        yield box


def run_timed(box: Sandbox, program: str, inputs: str = "0", repeats: int = 1):
    t = time.monotonic()
    r = box.run(program, inputs, repeats=repeats)
    elapsed = time.monotonic() - t
    assert elapsed < LIMIT, (elapsed, r)
    return r


def still_works(box: Sandbox) -> None:
    r = box.run("def f(a):\n    return a + 1", "41")
    assert r.ok and r.output == "42", r


def _fn(body: str) -> str:
    return "def f(a):\n" + "\n".join("    " + line for line in body.strip("\n").split("\n"))


# ---------------------------------------------------------------- filesystem


@pytest.mark.parametrize("how", ["os", "introspect"])
def test_cannot_create_files_outside_tmp(sb, raw, how):
    target = Path("/tmp") / f"azr_pwn_{uuid.uuid4().hex}"
    mod = OS if how == "os" else INTROSPECT_OS
    call = "os.open" if how == "os" else "os['open']"
    flags = "os.O_CREAT | os.O_WRONLY" if how == "os" else "os['O_CREAT'] | os['O_WRONLY']"
    prog = _fn(f"os = {mod}\nfd = {call}({str(target)!r}, {flags})\nreturn 'created'")
    assert run_timed(sb, prog).error.startswith("forbidden attribute: ")     # the screen stops both routes ...
    r = run_timed(raw, prog)                                                  # ... and so does the OS layer
    assert not target.exists()
    assert r.output != "'created'" and "PermissionError" in (r.error or ""), r


def test_cannot_write_project_or_home(raw, tmp_path):
    victims = [Path(__file__).resolve().parents[1] / f"pwn_{uuid.uuid4().hex}", Path.home() / "pwn_azr",
               tmp_path / "pwn.txt", Path("/dev/shm") / f"pwn_{uuid.uuid4().hex}"]
    prog = _fn(f"""
made = []
for p in {[str(v) for v in victims]!r}:
    try:
        with open(p, 'w') as fh:
            fh.write('x')
        made.append(p)
    except OSError:
        pass
return made""")
    r = run_timed(raw, prog)
    assert r.ok and r.output == "[]", r
    assert not any(v.exists() for v in victims)


def test_cannot_modify_or_read_existing_files(raw, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("gold answer")
    secret.chmod(0o644)
    prog = _fn(f"""
import os
out = []
for action in ('read', 'append', 'chmod', 'unlink', 'rename', 'truncate', 'utime'):
    try:
        p = {str(secret)!r}
        if action == 'read':
            out.append(open(p).read())
        elif action == 'append':
            open(p, 'a').write('pwned')
        elif action == 'chmod':
            os.chmod(p, 0o777)
        elif action == 'unlink':
            os.unlink(p)
        elif action == 'rename':
            os.rename(p, p + '.x')
        elif action == 'truncate':
            os.truncate(p, 0)
        else:
            os.utime(p, (0, 0))
        out.append(action)
    except OSError:
        pass
return out""")
    r = run_timed(raw, prog)
    assert r.ok and r.output == "[]", r
    assert secret.read_text() == "gold answer" and (secret.stat().st_mode & 0o777) == 0o644
    assert secret.stat().st_mtime > 0


def test_cannot_read_outside_stdlib(raw):
    prog = _fn("""
out = []
for p in ('/etc/passwd', '/proc/1/environ', '/proc/self/../1/cmdline', '/root/.bash_history'):
    try:
        out.append(open(p, 'rb').read(10))
    except OSError:
        pass
return len(out)""")
    r = run_timed(raw, prog)
    assert r.ok and r.output == "0", r


def test_private_cwd_is_fresh_and_removed(raw):
    prog = _fn("""
import os
before = sorted(os.listdir('.'))
open('state.txt', 'w').write('x' * 1000)
os.mkdir('sub')
open('sub/deep.txt', 'w').write('y')
return [before, os.getcwd()]""")
    rs = raw.run_many([(prog, "0")] * 4)
    cwds = set()
    for r in rs:
        assert r.ok and r.output.startswith("[[], "), r
        cwds.add(r.output)
    assert len(cwds) == 4                              # a different directory each time
    still_works(raw)
    time.sleep(0.3)                                    # workers clean up right after replying
    assert not list(Path(raw.base_dir).rglob("state.txt")) and not list(Path(raw.base_dir).rglob("deep.txt"))
    dirs = [p for p in Path(raw.base_dir).iterdir() if p.is_dir()]
    assert len(dirs) <= raw.num_workers                # only the pre-forked children's (empty) dirs


def test_deleting_cwd_and_huge_files(raw):
    r = run_timed(raw, _fn("import shutil, os\nshutil.rmtree(os.getcwd(), ignore_errors=True)\nreturn 1"))
    assert r.ok and r.output == "1", r             # its own dir's contents only; nothing else is touched
    r = run_timed(raw, _fn("open('big', 'wb').write(b'x' * (50 << 20))\nreturn 1"))
    assert not r.ok and ("File too large" in r.error or r.error == "memory"), r
    still_works(raw)


# ---------------------------------------------------------------- network


def test_sockets_refused(raw):
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    prog = _fn(f"""
import socket
out = []
for fam, kind, addr in ((socket.AF_INET, socket.SOCK_STREAM, ('127.0.0.1', {port})),
                        (socket.AF_INET, socket.SOCK_STREAM, ('1.1.1.1', 80)),
                        (socket.AF_INET, socket.SOCK_DGRAM, ('8.8.8.8', 53)),
                        (socket.AF_UNIX, socket.SOCK_STREAM, '/run/systemd/private')):
    try:
        s = socket.socket(fam, kind)
        s.settimeout(0.3)
        s.connect(addr)
        s.send(b'hello')
        out.append(str(addr))
    except OSError:
        pass
return out""")
    r = run_timed(raw, prog)
    assert r.ok and r.output == "[]", r
    with pytest.raises(socket.timeout):
        server.accept()                                 # nothing ever connected
    server.close()


def test_socket_via_ctypes_syscall(raw):
    prog = _fn("""
import ctypes
libc = ctypes.CDLL(None)
return [libc.syscall(41, 2, 1, 0), libc.syscall(57), libc.syscall(272, 0x40000000)]""")   # socket fork unshare
    r = run_timed(raw, prog)
    assert r.ok and r.output == "[-1, -1, -1]", r


# ---------------------------------------------------------------- processes and signals


def _children_of(pids: set[int]) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid in pids:
                found.append(int(d.name))
    return found


def test_no_new_processes(raw, tmp_path):
    marker = Path("/tmp") / f"azr_spawned_{uuid.uuid4().hex}"
    prog = _fn(f"""
import os, subprocess
out = []
for attempt in ('fork', 'system', 'popen', 'spawn'):
    try:
        if attempt == 'fork':
            pid = os.fork()
            if pid == 0:
                open({str(marker)!r}, 'w').write('child')
                os._exit(0)
        elif attempt == 'system':
            if os.system('touch {marker}') == 0:
                out.append('system')
            continue
        elif attempt == 'popen':
            subprocess.run(['touch', {str(marker)!r}])
        else:
            os.posix_spawn('/bin/touch', ['touch', {str(marker)!r}], {{}})
        out.append(attempt)
    except OSError:
        pass
return out""")
    workers = {w.proc.pid for w in raw._workers}
    r = run_timed(raw, prog)
    assert r.ok and r.output == "[]", r
    time.sleep(0.1)
    assert not marker.exists()
    grandchildren = _children_of(set(_children_of(workers)))
    assert grandchildren == []


def test_fork_bomb_and_threads(raw):
    r = run_timed(raw, _fn("import os\nwhile True:\n    os.fork()"))
    assert not r.ok and "PermissionError" in r.error, r
    r = run_timed(raw, _fn("import threading\nt = threading.Thread(target=print)\nt.start()\nreturn 1"))
    assert not r.ok and "thread" in r.error.lower(), r
    still_works(raw)


def test_cannot_signal_parent_worker_or_others(raw):
    hits = []
    old = signal.signal(signal.SIGUSR1, lambda *a: hits.append(1))
    try:
        workers = [w.proc.pid for w in raw._workers]
        prog = _fn(f"""
import os, signal
out = []
for pid in {[os.getpid()] + workers!r} + [os.getppid()]:
    for sig in (signal.SIGUSR1, signal.SIGKILL):
        try:
            os.kill(pid, sig)
            out.append(pid)
        except OSError:
            pass
try:
    os.killpg(os.getpgid({os.getpid()}), signal.SIGUSR1)
    out.append('pg')
except OSError:
    pass
return out""")
        r = run_timed(raw, prog)
        time.sleep(0.1)
        assert r.ok and r.output == "[]", r
        assert hits == []
        assert all(w.proc.poll() is None for w in raw._workers)
    finally:
        signal.signal(signal.SIGUSR1, old)
    still_works(raw)


def test_cannot_raise_limits_or_regain_privileges(raw):
    prog = _fn("""
import resource, os
out = []
for res in (resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_NPROC):
    try:
        resource.setrlimit(res, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        out.append(res)
    except (OSError, ValueError):
        pass
for call in (lambda: os.setuid(0), lambda: os.chroot('/'), lambda: os.setpgid(0, 1)):
    try:
        call()
        out.append('priv')
    except OSError:
        pass
return out""")
    r = run_timed(raw, prog)
    assert r.ok and r.output == "[]", r


@pytest.mark.parametrize("body, expect", [
    ("import os\nos.kill(os.getpid(), 9)", "crashed: SIGKILL"),
    ("import os\nos.kill(os.getpid(), 15)", "crashed: SIGTERM"),
    ("import os\nos._exit(0)", "exited without result (code 0)"),
    ("import sys\nsys.exit(3)", "SystemExit: 3"),
    ("raise KeyboardInterrupt", "KeyboardInterrupt"),
    ("import os\nos.closerange(0, 100)\nreturn 1", None),
    ("import os\nfor fd in range(0, 10):\n    os.dup2(0, fd) if fd > 2 else None\nreturn 1", None),
    ("import ctypes\nctypes.string_at(0)", "crashed: SIGSEGV"),
    ("import sys\nsys.setrecursionlimit(10**6)\ndef g(n):\n    return g(n + 1)\nreturn g(0)",
     ("crashed: SIGSEGV", "timeout", "memory")),
])
def test_self_destruction_is_a_clear_result(raw, body, expect):
    r = run_timed(raw, _fn(body))
    assert not r.ok and r.error, r
    if isinstance(expect, tuple):
        assert r.error in expect, r
    elif expect:
        assert r.error == expect, r
    still_works(raw)


# ---------------------------------------------------------------- time and memory


@pytest.mark.parametrize("body", [
    "while True:\n    pass",
    "import time\ntime.sleep(100)",
    "import select\nselect.select([], [], [], 100)",
    "import os\nos.read(0, 1) and None\nimport time\ntime.sleep(100)",
    "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass",
    "try:\n    while True:\n        pass\nfinally:\n    while True:\n        pass",
])
def test_timeouts_are_bounded(raw, body):
    r = run_timed(raw, _fn(body))
    assert r.error == "timeout", r
    still_works(raw)


@pytest.mark.parametrize("body", [
    "x = []\nwhile True:\n    x.append(bytearray(10**7))",
    "return bytearray(10**10)",
    "return [0] * 10**9",
    "return 'x' * (1 << 40)",
])
def test_memory_bombs(raw, body):
    r = run_timed(raw, _fn(body))
    assert r.error == "memory", r
    still_works(raw)


def test_printing_gigabytes(raw):
    r = run_timed(raw, _fn("import sys\nwhile True:\n    sys.stdout.write('x' * 10**6)"))
    assert not r.ok and (r.error == "timeout" or "File too large" in r.error), r
    assert len(r.stdout) <= 4000
    still_works(raw)


def test_huge_and_strange_returns(sb):
    assert run_timed(sb, _fn("return list(range(10**6))")).error.startswith("output too long")
    assert "Exceeds the limit" in run_timed(sb, _fn("return 10**100000")).error
    r = run_timed(sb, _fn("return lambda: 1"))
    assert r.ok and not r.literal and r.output.startswith("<function")
    r = run_timed(sb, _fn("class R:\n    def __repr__(self):\n        return 5\nreturn R()"))
    assert not r.ok and "TypeError" in r.error
    r = run_timed(sb, _fn("class R:\n    def __repr__(self):\n        while True:\n            pass\nreturn R()"))
    assert r.error == "timeout"
    r = run_timed(sb, _fn("x = []\nfor _ in range(60):\n    x = [x, x]\nreturn x"))   # 2**60 leaves, tiny object
    assert r.error.startswith("output too long")


# ---------------------------------------------------------------- reward hacks


def test_eq_always_true_gains_nothing(sb):
    prog = _fn("class Any:\n    def __eq__(self, other):\n        return True\nreturn Any()")
    r = run_timed(sb, prog)
    assert r.ok and not r.literal
    for gold in ("[1, 2, 3]", "'hello'", "42"):
        assert not same_output(r.output, gold) and not output_matches(r, gold)


def test_repr_forging_the_gold_text_is_flagged(sb):
    gold = "[1, 2, 3]"
    prog = _fn(f"class Forge:\n    def __repr__(self):\n        return {gold!r}\nreturn Forge()")
    r = run_timed(sb, prog)
    assert r.ok and r.output == gold and not r.literal     # the text matches, but it is not a genuine literal
    assert not output_matches(r, gold)
    prog = _fn(f"class S(str):\n    def __repr__(self):\n        return {gold!r}\nreturn S('x')")
    r = run_timed(sb, prog)
    assert not r.literal and not output_matches(r, gold)
    prog = _fn("class L(list):\n    def __eq__(self, o):\n        return True\nreturn L([1, 2, 3])")
    r = run_timed(sb, prog)
    assert r.output == gold and not r.literal and not output_matches(r, gold)
    assert output_matches(run_timed(sb, _fn("return [1, 2, 3]")), gold)


def test_nondeterminism_cannot_pass_repeats(sb):
    prog = _fn("class C:\n    pass\nreturn repr(C())")          # contains an address per run
    r = run_timed(sb, prog, repeats=2)
    assert r.error == "nondeterministic", r                # separate processes: the addresses differ
    prog = _fn("import random\nreturn random.random()")
    assert run_timed(sb, prog, repeats=2).error == "forbidden import: random"


def test_parent_unharmed():
    cwd, env, mods = os.getcwd(), dict(os.environ), set(sys.modules)
    threads = threading.active_count()
    with Sandbox(timeout=TIMEOUT, workers=1, screen=False) as box:
        hostile = [_fn("import os\nos.chdir('/')\nos.environ['PWNED'] = '1'\nreturn 1"),
                   _fn("import os\nos.kill(os.getppid(), 9)"),
                   _fn("import sys\nsys.modules.clear()\nreturn 1")]
        box.run_many([(p, "0") for p in hostile])
        still_works(box)
        pids = [w.proc.pid for w in box._workers]
    assert os.getcwd() == cwd and dict(os.environ) == env and "PWNED" not in os.environ
    assert set(sys.modules) >= mods and threading.active_count() == threads
    assert _children_of({os.getpid()}) == [] or all(p not in pids for p in _children_of({os.getpid()}))
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


def test_parent_killed_mid_job_leaves_nothing():
    import subprocess
    code = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
            "from sandbox import Sandbox\n"
            "sb = Sandbox(timeout=30, workers=2)\n"
            "print(sb.base_dir, *[w.proc.pid for w in sb._workers], flush=True)\n"
            "sb.run('def f(a):\\n    while True:\\n        pass', '0')\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    base, *pids = p.stdout.readline().split()
    time.sleep(0.5)                                    # the hostile job is running
    p.kill()
    p.wait()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and (any(Path(f"/proc/{pid}").exists() for pid in pids)
                                           or Path(base).exists()):
        time.sleep(0.05)
    # workers see EOF, kill their children (PDEATHSIG covers a dead worker) and remove the base dir
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert alive == [] and not Path(base).exists()
    assert not [c for c in _children_of({int(x) for x in pids})]


def test_forged_result_lines_are_bounded(raw):
    # A program that reaches os can write its own result line; the worker accepts only the expected shape.
    forged = ('{"ok": true, "output": "' + "x" * 5000 + '", "literal": true, "error": null}\n')
    r = run_timed(raw, _fn(f"import os\nos.write(3, {forged.encode()!r})\nwhile True:\n    pass"))
    assert not r.ok and r.output is None and r.error.startswith(("exited without result", "crashed")), r
    r = run_timed(raw, _fn("import os\nos.write(3, b'[1, 2]\\n')\nreturn 1"))
    assert not r.ok and r.output is None, r
    still_works(raw)
