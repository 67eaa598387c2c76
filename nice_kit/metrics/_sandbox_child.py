"""The sandbox child's bootstrap: the first Python code a sandboxed run executes.

:mod:`nice_kit.metrics.sandbox` runs this file's source as ``python -I -B -c <source> <config>``
(or precompiled, when the child's interpreter is the parent's own). It is ours (trusted): it sets
the resource limits, drops to the unprivileged uid, starts the supervisor (the fallback), applies
Landlock and seccomp, and only then runs the untrusted file named in the config. It must run on any
Python 3 (a system ``python3`` in the fallback), so it uses the standard library only. Importing it
does nothing (the functions are here to be read, linted and tested).

The config (JSON, the first argument): ``rlimits`` ([name, value] pairs), ``uid``/``gid`` (to drop
to, as root), ``site`` (site directories to add), ``script`` (the untrusted file: source or a .pyc
of this interpreter), ``workdir``, ``report_fd`` (the report channel's descriptor, moved to 3),
``fallback`` (the stricter seccomp rules), ``supervise``, ``landlock`` and ``parent`` (our
parent's pid). The script sees ``__nice_sandbox__``: what was set up (``landlock`` ABI,
``seccomp``, ``supervisor``).
"""

import json, os, resource, sys


def _linux_tools():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def prctl(option, *args):
        args = [ctypes.c_ulong(a) for a in args] + [ctypes.c_ulong(0)] * (4 - len(args))
        if libc.prctl(ctypes.c_int(option), *args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "prctl(%d): %s" % (option, os.strerror(err)))

    return ctypes, libc, prctl


def _children(pid):
    out = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(x) for x in f.read().split()]
        return out
    except (OSError, ValueError):
        pass
    for name in os.listdir("/proc"):  # kernels without /proc/<pid>/task/<tid>/children
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _supervise(child):
    # A child subreaper: every orphan the code leaves (a daemon that left the session) becomes
    # our child. When the code exits, or the parent asks (SIGTERM), kill them all, then leave
    # with the code's status.
    import signal, time
    me = os.getpid()

    def sweep():
        while True:
            for pid in _children(me):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.001)

    def stop(signum, frame):
        sweep()
        os._exit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    status = None
    while status is None:
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == child:
            status = st
    sweep()
    if status is None:
        os._exit(125)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass
        os.kill(me, sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 125)


def _landlock(ctypes, libc, workdir):
    import struct
    sysc = libc.syscall
    abi = sysc(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint(1))
    if abi < 1:
        return 0
    fs = (1 << 13) - 1
    if abi >= 2:
        fs |= 1 << 13  # REFER
    if abi >= 3:
        fs |= 1 << 14  # TRUNCATE
    net = 3 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, with no rule allowing any port
    scoped = 3 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    attr = ctypes.create_string_buffer(struct.pack("=QQQ", fs, net, scoped)[:size], size)
    ruleset = sysc(ctypes.c_long(444), attr, ctypes.c_size_t(size), ctypes.c_uint(0))
    if ruleset < 0:
        err = ctypes.get_errno()
        raise OSError(err, "landlock_create_ruleset: " + os.strerror(err))

    def allow(path, access):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            rule = ctypes.create_string_buffer(struct.pack("=Qi", access & fs, fd), 12)
            if sysc(ctypes.c_long(445), ctypes.c_int(ruleset), ctypes.c_int(1), rule, ctypes.c_uint(0)) < 0:
                err = ctypes.get_errno()
                raise OSError(err, "landlock_add_rule(%s): %s" % (path, os.strerror(err)))
        finally:
            os.close(fd)

    allow("/", 1 | 4 | 8)  # EXECUTE, READ_FILE, READ_DIR
    allow(workdir, fs)
    for dev in ("/dev/null", "/dev/zero", "/dev/full"):
        if os.path.exists(dev):
            allow(dev, 2 | 4 | (1 << 14))  # WRITE_FILE, READ_FILE, TRUNCATE
    if sysc(ctypes.c_long(446), ctypes.c_int(ruleset), ctypes.c_uint(0)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, "landlock_restrict_self: " + os.strerror(err))
    os.close(ruleset)
    return abi


_SYSCALLS = {
    "x86_64": (0xC000003E, {
        "unshare": 272, "clone": 56, "clone3": 435, "kill": 62, "tkill": 200, "tgkill": 234,
        "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "pidfd_send_signal": 424, "pidfd_getfd": 438,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "socket": 41,
        "io_uring_setup": 425, "fcntl": 72, "ioctl": 16, "shmget": 29, "msgget": 68}),
    "aarch64": (0xC00000B7, {
        "unshare": 97, "clone": 220, "clone3": 435, "kill": 129, "tkill": 130, "tgkill": 131,
        "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240, "pidfd_send_signal": 424, "pidfd_getfd": 438,
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "socket": 198,
        "io_uring_setup": 425, "fcntl": 25, "ioctl": 29, "shmget": 194, "msgget": 186}),
}


def _seccomp(ctypes, prctl, fallback, signals):
    machine = os.uname().machine
    if machine not in _SYSCALLS or sys.byteorder != "little":
        return False
    arch, nr = _SYSCALLS[machine]
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, ENOSYS), (LD, 0, 0, 0)]
    if machine == "x86_64":
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, ENOSYS)]  # x32 calls

    def block(name, body):
        return [(LD, 0, 0, 0), (JEQ, 0, len(body), nr[name])] + body

    def arg(i, values, allowed):
        # allowed: only these values pass; else: these values are refused. Low 32 bits.
        n = len(values)
        tail = [(RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)] if allowed else [(RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
        return [(LD, 0, 0, 16 + 8 * i)] + [(JEQ, n - j, 0, v & 0xFFFFFFFF) for j, v in enumerate(values)] + tail

    no_newuser = [(LD, 0, 0, 16), (JSET, 0, 1, 0x10000000), (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)]
    prog += block("unshare", no_newuser) + block("clone", no_newuser) + block("clone3", [(RET, 0, 0, ENOSYS)])
    # System V shared memory and message queues: memory outside every limit above (and, without an
    # IPC namespace, left behind after the run)
    prog += block("shmget", [(RET, 0, 0, EPERM)]) + block("msgget", [(RET, 0, 0, EPERM)])
    if fallback and signals:  # without Landlock's signal scope (ABI 6): only to itself and its group
        me = os.getpid()
        prog += block("kill", arg(0, [0, me, -me], True))
        for name in ("tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
            prog += block(name, arg(0, [me], True))
        prog += block("pidfd_send_signal", [(RET, 0, 0, EPERM)])
        prog += block("fcntl", arg(1, [8, 10, 15], False))  # F_SETOWN, F_SETSIG, F_SETOWN_EX
        prog += block("ioctl", arg(1, [0x8901, 0x8902], False))  # FIOSETOWN, SIOCSPGRP
    if fallback:
        for name in ("pidfd_getfd", "ptrace", "process_vm_readv", "process_vm_writev", "socket", "io_uring_setup"):
            prog += block(name, [(RET, 0, 0, EPERM)])
    prog.append((RET, 0, 0, ALLOW))

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    insns = (Insn * len(prog))(*[Insn(*i) for i in prog])
    fprog = Prog(len(prog), insns)
    prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
    prctl(22, 2, ctypes.addressof(fprog))  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    return True


def _boot(c):
    """Everything before the untrusted code runs, in this order: the report channel on fd 3, the
    resource limits, the unprivileged uid, then (Linux) the supervisor, no_new_privs, Landlock and
    seccomp; then the site directories and the umask. Returns what was set up."""
    info = {"landlock": 0, "seccomp": False, "supervisor": False}
    rfd = c["report_fd"]
    if rfd is not None:
        if rfd != 3:
            os.dup2(rfd, 3, inheritable=False)
            os.close(rfd)
        else:
            os.set_inheritable(3, False)
    for name, value in c["rlimits"]:
        which = getattr(resource, name, None)
        if which is None:
            continue
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and value > hard:
            value = hard
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            if sys.platform.startswith("linux"):
                raise
            # macOS refuses some limits (RLIMIT_AS): the run goes on without that one
    if c["uid"] is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(c["gid"], c["gid"], c["gid"])
        os.setresuid(c["uid"], c["uid"], c["uid"])
        if 0 in os.getresuid() or 0 in os.getresgid():
            os._exit(125)
    if sys.platform.startswith("linux"):
        ct, libc, prctl = _linux_tools()
        if c["supervise"]:
            prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
            prctl(1, 15)  # PR_SET_PDEATHSIG SIGTERM: if the scoring process dies, sweep and leave
            if os.getppid() != c["parent"]:
                os._exit(125)
            prctl(4, 0)  # PR_SET_DUMPABLE 0: the code (same uid) cannot ptrace us or open /proc/<us>/*
            import signal
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # until the supervisor's handler is in place
            pid = os.fork()
            if pid:
                if rfd is not None:
                    os.close(3)  # only the code's process holds the report channel
                _supervise(pid)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.setpgid(0, 0)  # its own group: killpg(0) cannot reach the supervisor
            info["supervisor"] = True
        prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
        if c["landlock"]:
            info["landlock"] = _landlock(ct, libc, c["workdir"])
        info["seccomp"] = _seccomp(ct, prctl, c["fallback"], info["landlock"] < 6)
    if c["site"]:
        import site
        for path in c["site"]:
            site.addsitedir(path)
    os.umask(0o077)
    return info


if __name__ == "__main__":
    _c = json.loads(sys.argv[1])
    _info = _boot(_c)
    _script = _c["script"]
    sys.argv = [_script]
    with open(_script, "rb") as _f:
        _code = _f.read()
    import marshal, types
    # a .pyc written by the parent (same interpreter: it checked) or source
    _code = marshal.loads(_code[16:]) if _script.endswith(".pyc") else compile(_code, _script, "exec")
    _main = types.ModuleType("__main__")
    _main.__dict__.update(__file__=_script, __builtins__=__builtins__, __nice_sandbox__=_info)
    sys.modules["__main__"] = _main
    del _c, _f
    exec(_code, _main.__dict__)
