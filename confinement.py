"""Kernel confinement of the sandbox's children (Linux; elsewhere only the rlimits apply).

sandbox.py's workers call `prepare_worker` once at start-up (it builds every buffer and filter); each pre-forked
child then calls `confine`, which only makes the system calls and returns which rules took effect. What each rule
stops: docs/SANDBOX.md.
"""

from __future__ import annotations

import math
import os

# ----------------------------------------------------------------------------------------------------------
# kernel constants (from the Linux uapi headers)

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
LINUX_CAPABILITY_VERSION_3 = 0x20080522
EPERM = 1

# Syscall numbers by architecture. The seccomp filter exists for x86_64 only; the Landlock calls have the same
# number on every architecture (the unified numbering from 424 on), so they are listed under "all".
SYSCALL_NUMBERS: dict[str, dict[str, int]] = {
    "all": {"landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446},
    "x86_64": {
        "shmget": 29, "shmat": 30, "shmctl": 31, "socket": 41, "connect": 42, "accept": 43, "bind": 49,
        "listen": 50, "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "kill": 62,
        "semget": 64, "semop": 65, "semctl": 66, "shmdt": 67, "msgget": 68, "msgsnd": 69, "msgrcv": 70,
        "msgctl": 71, "chmod": 90, "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94, "ptrace": 101,
        "syslog": 103, "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114, "setgroups": 116,
        "setresuid": 117, "setresgid": 119, "setfsuid": 122, "setfsgid": 123, "capset": 126,
        "rt_sigqueueinfo": 129, "utime": 132, "mknod": 133, "personality": 135, "setpriority": 141,
        "sched_setparam": 142, "sched_setscheduler": 144, "vhangup": 153, "pivot_root": 155, "prctl": 157,
        "adjtimex": 159, "setrlimit": 160, "chroot": 161, "acct": 163, "settimeofday": 164, "mount": 165,
        "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171,
        "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176, "quotactl": 179, "setxattr": 188,
        "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199,
        "tkill": 200, "sched_setaffinity": 203, "lookup_dcookie": 212, "semtimedop": 220, "clock_settime": 227,
        "tgkill": 234, "utimes": 235, "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242,
        "mq_timedreceive": 243, "mq_notify": 244, "mq_getsetattr": 245, "kexec_load": 246, "add_key": 248,
        "request_key": 249, "keyctl": 250, "ioprio_set": 251, "migrate_pages": 256, "mknodat": 259,
        "fchownat": 260, "futimesat": 261, "fchmodat": 268, "unshare": 272, "move_pages": 279, "utimensat": 280,
        "accept4": 288, "rt_tgsigqueueinfo": 297, "perf_event_open": 298, "prlimit64": 302,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308,
        "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313, "kexec_file_load": 320,
        "bpf": 321, "execveat": 322, "userfaultfd": 323, "pidfd_send_signal": 424, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435, "pidfd_getfd": 438,
        "mount_setattr": 442, "fchmodat2": 452,
    },
}

# seccomp: classic BPF over struct seccomp_data {int nr; u32 arch; u64 instruction_pointer; u64 args[6];}
BPF_LD, BPF_JMP, BPF_RET = 0x00, 0x05, 0x06          # instruction classes
BPF_W, BPF_ABS, BPF_K = 0x00, 0x20, 0x00             # 32-bit load, absolute offset, constant operand
BPF_JEQ, BPF_JGE = 0x10, 0x30
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SECCOMP_DATA_NR, SECCOMP_DATA_ARCH = 0, 4             # offsets into seccomp_data


def seccomp_data_arg(n: int, high: bool = False) -> int:
    """Offset of the low (or high) 32 bits of args[n] in seccomp_data (little-endian)."""
    return 16 + 8 * n + (4 if high else 0)


# Landlock access rights, each with the ABI version that introduced it.
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_ACCESS_FS: dict[str, tuple[int, int]] = {     # LANDLOCK_ACCESS_FS_<name>: (bit, ABI)
    "EXECUTE": (1 << 0, 1), "WRITE_FILE": (1 << 1, 1), "READ_FILE": (1 << 2, 1), "READ_DIR": (1 << 3, 1),
    "REMOVE_DIR": (1 << 4, 1), "REMOVE_FILE": (1 << 5, 1), "MAKE_CHAR": (1 << 6, 1), "MAKE_DIR": (1 << 7, 1),
    "MAKE_REG": (1 << 8, 1), "MAKE_SOCK": (1 << 9, 1), "MAKE_FIFO": (1 << 10, 1), "MAKE_BLOCK": (1 << 11, 1),
    "MAKE_SYM": (1 << 12, 1), "REFER": (1 << 13, 2), "TRUNCATE": (1 << 14, 3), "IOCTL_DEV": (1 << 15, 5),
}
LANDLOCK_ACCESS_FS_EXECUTE = LANDLOCK_ACCESS_FS["EXECUTE"][0]
LANDLOCK_ACCESS_FS_READ_FILE = LANDLOCK_ACCESS_FS["READ_FILE"][0]
LANDLOCK_ACCESS_FS_READ_DIR = LANDLOCK_ACCESS_FS["READ_DIR"][0]
LANDLOCK_ACCESS_NET_BIND_TCP, LANDLOCK_ACCESS_NET_CONNECT_TCP = 1 << 0, 1 << 1              # ABI 4
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET, LANDLOCK_SCOPE_SIGNAL = 1 << 0, 1 << 1                 # ABI 6

# The child's fd layout (set up by sandbox.py): 0 /dev/null, 1-2 output, 3 result, 4 job, RW_FD its temp dir
# (O_PATH), FIRST_READ_FD.. O_PATH fds of the read dirs. The Landlock rules name these fds; `confine` closes them.
RW_FD = 5
FIRST_READ_FD = 6

# ----------------------------------------------------------------------------------------------------------
# seccomp

# What the x86_64 filter denies with EPERM (besides the signal and prlimit64 calls it checks by argument).
SECCOMP_DENY: tuple[str, ...] = (
    "socket", "connect", "accept", "bind", "listen", "socketpair", "accept4",
    "clone", "fork", "vfork", "execve", "execveat", "clone3",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_send_signal", "pidfd_open", "pidfd_getfd",
    "setrlimit",
    "setuid", "setgid", "setreuid", "setregid", "setgroups", "setresuid", "setresgid", "setfsuid", "setfsgid",
    "capset", "prctl", "personality",
    "chmod", "fchmod", "chown", "fchown", "lchown", "fchownat", "fchmodat", "fchmodat2",          # file modes
    "utime", "utimes", "futimesat", "utimensat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "mknod", "mknodat",
    "mount", "umount2", "pivot_root", "chroot", "swapon", "swapoff", "reboot", "sethostname", "setdomainname",
    "iopl", "ioperm", "init_module", "delete_module", "finit_module", "quotactl", "acct", "syslog", "kexec_load",
    "kexec_file_load", "unshare", "setns", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "add_key", "request_key", "keyctl", "name_to_handle_at",
    "open_by_handle_at", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "lookup_dcookie", "vhangup", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime",  # misc privileged
    "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop",            # SysV IPC
    "msgget", "msgsnd", "msgrcv", "msgctl",
    "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",     # POSIX mqueues
    "setpriority", "sched_setparam", "sched_setscheduler", "sched_setaffinity", "ioprio_set", "migrate_pages",
    "move_pages",
)
# Signals: allowed only to ourselves (kill and rt_sigqueueinfo also to our process group, as pid 0 or -pid).
SECCOMP_OWN_SIGNALS: tuple[str, ...] = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
SECCOMP_OWN_GROUP_SIGNALS: tuple[str, ...] = ("kill", "rt_sigqueueinfo")
TEMPLATE_PID = 0x3FFFFFF1   # a placeholder in the filter, never a real pid (pid_max <= 2**22)


def bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    """One struct sock_filter instruction."""
    import struct
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def bpf_load(offset: int) -> bytes:
    return bpf(BPF_LD | BPF_W | BPF_ABS, 0, 0, offset)


def bpf_ret(action: int) -> bytes:
    return bpf(BPF_RET | BPF_K, 0, 0, action)


def _seccomp_tree(ranges: list[tuple[int, bytes]]) -> bytes:
    """Binary search over syscall-number ranges (short filters: cheap to attach and to run)."""
    if len(ranges) == 1:
        return ranges[0][1]
    mid = len(ranges) // 2
    left, right = _seccomp_tree(ranges[:mid]), _seccomp_tree(ranges[mid:])
    if len(left) // 8 > 255:
        raise ValueError("seccomp filter too large")
    return bpf(BPF_JMP | BPF_JGE | BPF_K, len(left) // 8, 0, ranges[mid][0]) + left + right


def seccomp_program(pid: int) -> bytes:
    """The x86_64 filter for process `pid`: deny-list (EPERM); signals only to ourselves; prlimit64 only to read
    limits. A call of another architecture (i386) kills the process; every x32 call gets EPERM."""
    nr = SYSCALL_NUMBERS["x86_64"]
    allow, deny = bpf_ret(SECCOMP_RET_ALLOW), bpf_ret(SECCOMP_RET_ERRNO | EPERM)
    actions: dict[int, bytes] = {nr[name]: deny for name in SECCOMP_DENY}
    own = sorted({pid, 0, -pid})
    for name in SECCOMP_OWN_SIGNALS:
        block = bpf_load(seccomp_data_arg(0))
        for target in (own if name in SECCOMP_OWN_GROUP_SIGNALS else [pid]):
            block += bpf(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, target) + allow
        actions[nr[name]] = block + deny
    actions[nr["prlimit64"]] = (                                    # new_limit (args[2]) must be NULL
        bpf_load(seccomp_data_arg(2)) + bpf(BPF_JMP | BPF_JEQ | BPF_K, 0, 3, 0)
        + bpf_load(seccomp_data_arg(2, high=True)) + bpf(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0) + allow + deny)
    ranges: list[tuple[int, bytes]] = [(0, allow)]
    for number in range(max(actions) + 2):
        act = actions.get(number, allow)
        if act != ranges[-1][1] or act not in (allow, deny):
            ranges.append((number, act))
    if ranges[0][0] == ranges[1][0]:
        ranges.pop(0)
    head = (bpf_load(SECCOMP_DATA_ARCH) + bpf(BPF_JMP | BPF_JEQ | BPF_K, 1, 0, AUDIT_ARCH_X86_64)
            + bpf_ret(SECCOMP_RET_KILL_PROCESS)
            + bpf_load(SECCOMP_DATA_NR) + bpf(BPF_JMP | BPF_JGE | BPF_K, 0, 1, X32_SYSCALL_BIT) + deny)
    return head + _seccomp_tree(ranges)


def _prepare_seccomp(ctypes) -> dict:
    """Worker start-up: the filter for a placeholder pid in a ctypes buffer, and where the pid goes. A child
    only writes its pid into its copy of the buffer and attaches it (no allocation: few copy-on-write faults)."""
    prog = seccomp_program(TEMPLATE_PID)
    buf = ctypes.create_string_buffer(prog, len(prog))
    words = memoryview(buf).cast("B").cast("I")
    pid_at = [i for i in range(1, len(words), 2) if words[i] == TEMPLATE_PID]              # the k fields
    neg_at = [i for i in range(1, len(words), 2) if words[i] == -TEMPLATE_PID & 0xFFFFFFFF]
    if not pid_at:
        raise RuntimeError("seccomp template: placeholder pid not found")

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
    return {"buf": buf, "fprog": fprog, "ref": ctypes.byref(fprog), "words": words, "pid_at": pid_at,
            "neg_at": neg_at}


def _install_seccomp(libc, sp: dict, pid: int) -> bool:
    """In the child: put our pid into the prepared filter and attach it."""
    words = sp["words"]
    for i in sp["pid_at"]:
        words[i] = pid
    for i in sp["neg_at"]:
        words[i] = -pid & 0xFFFFFFFF
    return libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, sp["ref"], 0, 0) == 0


# ----------------------------------------------------------------------------------------------------------
# Landlock


def landlock_abi(ctypes, libc) -> int:
    """The kernel's Landlock ABI version, 0 if there is none."""
    v = libc.syscall(SYSCALL_NUMBERS["all"]["landlock_create_ruleset"], None, ctypes.c_size_t(0),
                     ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(v, 0)


def _landlock_ruleset_attr(abi: int) -> tuple[int, bytes]:
    """(handled file-system rights, struct landlock_ruleset_attr) for this ABI: every file-system right it knows,
    TCP bind/connect from ABI 4, signal and abstract-unix-socket scoping from ABI 6."""
    import struct
    handled_fs = 0
    for bit, since in LANDLOCK_ACCESS_FS.values():
        if abi >= since:
            handled_fs |= bit
    net = LANDLOCK_ACCESS_NET_BIND_TCP | LANDLOCK_ACCESS_NET_CONNECT_TCP
    scoped = LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL
    if abi >= 6:
        return handled_fs, struct.pack("QQQ", handled_fs, net, scoped)
    if abi >= 4:
        return handled_fs, struct.pack("QQ", handled_fs, net)
    return handled_fs, struct.pack("Q", handled_fs)


def _prepare_landlock(ctypes, abi: int, read_dirs: list[str], prep: dict) -> None:
    """Worker start-up: the ruleset attr, one path-beneath rule for the child's temp dir (everything but
    EXECUTE, on fd RW_FD) and one read-only rule per read dir (its O_PATH fd kept open in prep["read_fds"])."""
    import struct
    handled_fs, attr = _landlock_ruleset_attr(abi)
    read = LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR
    prep["attr"] = ctypes.create_string_buffer(attr, len(attr))
    # struct landlock_path_beneath_attr (packed): u64 allowed_access, s32 parent_fd
    rules = [ctypes.create_string_buffer(struct.pack("=Qi", handled_fs & ~LANDLOCK_ACCESS_FS_EXECUTE, RW_FD), 12)]
    for d in read_dirs:
        try:
            fd = os.open(d, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        rules.append(ctypes.create_string_buffer(struct.pack("=Qi", read, FIRST_READ_FD + len(prep["read_fds"])),
                                                 12))
        prep["read_fds"].append(fd)
    prep["rules"] = rules
    prep["args"] = (ctypes.c_size_t(len(attr)), ctypes.c_uint32(0), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH))


def _install_landlock(libc, prep: dict) -> bool:
    """In the child: reads only under the prepared read dirs, everything but exec in its temp dir (fd RW_FD)."""
    nr = SYSCALL_NUMBERS["all"]
    size, zero, path_beneath = prep["args"]
    fd = libc.syscall(nr["landlock_create_ruleset"], prep["attr"], size, zero)
    if fd < 0:
        return False
    try:
        ok = all([libc.syscall(nr["landlock_add_rule"], fd, path_beneath, rule, zero) == 0 for rule in prep["rules"]])
        return ok and libc.syscall(nr["landlock_restrict_self"], fd, zero) == 0
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# the worker's start-up and the child's confinement


def rlimits(cfg: dict) -> list:
    """The children's rlimits as (resource, (soft, hard)); CPU seconds: the timeout rounded up, plus one."""
    import resource
    cpu = int(math.ceil(cfg["timeout"])) + 1
    limits = [(resource.RLIMIT_AS, int(cfg["memory_mb"]) << 20), (resource.RLIMIT_CPU, cpu),
              (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_FSIZE, int(cfg["max_file_bytes"])),
              (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]
    return [(r, (v, v + (1 if r == resource.RLIMIT_CPU else 0))) for r, v in limits]


def unshare_network(libc) -> bool:
    """Worker start-up: a private, empty network namespace (as root directly, else inside a user namespace)."""
    if libc.unshare(CLONE_NEWNET) == 0:
        return True
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return False
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
    except OSError:
        pass
    return True


def set_not_dumpable(libc) -> bool:
    """No /proc/<pid>/mem writes into this process (the children inherit it)."""
    return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 and libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0


def _prepare_confinement(ctypes, libc, abi: int, read_dirs: list[str], cfg: dict) -> dict:
    """Worker start-up: build every object the children need (ctypes buffers, rlimits, the seccomp template),
    so each child only makes the calls (fewer copy-on-write page faults per child, which is most of a fork's
    cost)."""
    for name in ("prctl", "syscall", "capset"):
        getattr(libc, name)                                     # cache the function pointers
    prep: dict = {"cap_hdr": (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0),
                  "cap_data": (ctypes.c_uint32 * 6)(), "read_fds": []}
    if abi > 0:
        _prepare_landlock(ctypes, abi, read_dirs, prep)
    if os.uname().machine == "x86_64" and "seccomp" not in cfg.get("disable", ()):
        prep["seccomp"] = _prepare_seccomp(ctypes)
    return prep


def prepare_worker(cfg: dict) -> dict:
    """Worker start-up: the rlimits, the network namespace, the prepared Landlock rules and seccomp template
    (Linux; a failure leaves rlimits only), and no dumping. The result is what `confine` takes."""
    import resource
    import sys
    disable = set(cfg.get("disable", ()))
    caps: dict = {"netns": False, "landlock_abi": 0, "nodump": False, "limits": rlimits(cfg),
                  "setrlimit": resource.setrlimit}
    if sys.platform == "linux":
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            caps["libc"] = libc
            caps["netns"] = "netns" not in disable and unshare_network(libc)
            caps["landlock_abi"] = 0 if "landlock" in disable else landlock_abi(ctypes, libc)
            caps["prep"] = _prepare_confinement(ctypes, libc, caps["landlock_abi"], cfg["read_dirs"], cfg)
            # Not dumpable (after the user-namespace setup, which writes /proc/self/*): the children inherit it,
            # so without Landlock a child still cannot open /proc/<worker>/mem to rewrite its unconfined parent.
            if "nodump" not in disable:
                caps["nodump"] = set_not_dumpable(libc)
        except Exception:
            caps.pop("libc", None)
            caps.pop("prep", None)
    return caps


def set_parent_death_signal(caps: dict, sig: int) -> None:
    """In the child: die by `sig` when the worker dies (Linux)."""
    if "libc" in caps:
        caps["libc"].prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def confine(caps: dict) -> dict:
    """In the child: rlimits, then capabilities, no_new_privs, Landlock, seccomp as available; closes the
    directory fds (RW_FD..). Returns what worked."""
    setrlimit = caps["setrlimit"]
    for res, lim in caps["limits"]:
        try:
            setrlimit(res, lim)
        except (ValueError, OSError):
            pass
    done = {"netns": caps.get("netns", False)}
    prep = caps.get("prep")
    if prep is None:                                           # not Linux, or ctypes failed: rlimits only
        return done
    libc = caps["libc"]
    done["nocaps"] = libc.capset(prep["cap_hdr"], prep["cap_data"]) == 0    # empty every capability set
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    done["landlock"] = "attr" in prep and _install_landlock(libc, prep)
    os.closerange(RW_FD, FIRST_READ_FD + len(prep["read_fds"]))
    done["seccomp"] = "seccomp" in prep and _install_seccomp(libc, prep["seccomp"], os.getpid())
    return done
