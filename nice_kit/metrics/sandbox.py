"""Run untrusted Python code (model completions) in a separate, limited process.

:func:`run_untrusted` runs a piece of Python source in a child process and returns a
:class:`SandboxResult`. Every run gets

* a scrubbed environment (``PATH``, ``LANG``, ``HOME``/``TMPDIR`` pointing at its working
  directory, thread counts of 1): nothing from the parent's environment reaches the child;
* resource limits set before the untrusted code starts: CPU time, address space (memory), number
  of processes, size of each written file, open files, no core dumps;
* a size and file-count limit on everything it can write (``max_disk_mb``, ``max_files``);
* a new session and process group, a wall-clock timeout after which everything the run started
  is killed (daemons that left the group included), and a cap on captured stdout/stderr (a run
  that prints more is killed);
* an unprivileged uid when the parent runs as root (RLIMIT_NPROC does not bind uid 0). A random
  uid is drawn per run, so that concurrent runs do not share a process count and every process the
  run left behind can be found by its uid and killed;
* a seccomp filter (Linux x86-64 and arm64) that refuses new user namespaces, so the code cannot
  gain capabilities in a namespace of its own (bubblewrap's ``--disable-userns`` as well, where
  bubblewrap runs unprivileged and supports it), and System V shared memory and message queues
  (memory outside every limit here);
* optionally a private report channel (``report_channel=True``): file descriptor 3, the write end of
  a pipe that only the started script holds (bubblewrap's init closes it); what it writes there
  comes back in :attr:`SandboxResult.report`. :mod:`nice_kit.metrics.code` reports test verdicts
  through it from a process the completion cannot reach.

With bubblewrap (``bwrap``) installed and working, the child also runs in its own mount, pid,
network, ipc and uts namespaces: a read-only view of ``/``, a private ``/tmp`` that is a tmpfs of
``max_disk_mb`` (``--size``) holding the working directory, so nothing it writes reaches the host's
disk and the memory it can pin is bounded; a fresh ``/proc`` showing only its own processes, a
minimal, read-only ``/dev``, no network at all, and ``no_new_privs``. Directories that the unprivileged uid
could not read anyway (such as ``/root``) are replaced by empty ones, except for the Python
installation the child needs. The tmpfs bounds bytes, not files: the parent counts the files
every 50 ms and kills a run that makes more than ``max_files``.

Without bubblewrap (:func:`sandbox_kind` says ``"rlimits-only"``; it warns once, naming what it
could set up) the child is a plain process of the same kernel, with on Linux:

* a supervisor process between the parent and the code: a child subreaper that kills every
  descendant (daemons included) when the code exits, the run is stopped, or the scoring process
  dies (a parent-death signal; bubblewrap has ``--die-with-parent``);
* Landlock, where the kernel has it: writes only inside the working directory, no ptrace-style
  access to processes outside the sandbox (so no ``/proc/<pid>/environ`` or ``/proc/<pid>/mem`` of
  the scoring process), no TCP (ABI 4), no signals or abstract unix sockets out of the sandbox
  (ABI 6);
* seccomp (x86-64, arm64): no sockets at all, no ptrace, no io_uring, no new user namespaces,
  and where Landlock cannot scope signals (ABI < 6), signals only to itself and its own process
  group (not to its children by pid) and no ``F_SETOWN``-style signal delivery;
* as root, the random uid; as a normal user the code keeps the user's own uid (nothing else is
  possible without privileges), so the parent is made non-dumpable while fallback runs are active
  (its environment and memory are then unreadable by the same uid even without Landlock);
* the working directory on the host's temporary directory, its size and file count checked every
  20 ms (a run over the limit is killed; a fast writer can overshoot by what it writes in that
  time).

Known limits: memory is limited per process (a run may use up to ``max_processes * memory_mb``);
the code can read world-readable files (and, in the fallback as a normal user, every file that
user can read); the fallback without Landlock can write wherever its uid can write; the fallback
on other systems (macOS) has the resource limits, the clean environment and the session only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Protocol

import psutil

__all__ = ["SandboxResult", "run_untrusted", "sandbox_kind", "BUBBLEWRAP", "RLIMITS_ONLY"]

BUBBLEWRAP = "bubblewrap"
RLIMITS_ONLY = "rlimits-only"
REPORT_FD = 3  # where the started script finds the report channel (``report_channel=True``)

_LINUX = sys.platform.startswith("linux")
_LANDLOCK = True  # the fallback applies Landlock where the kernel has it (tests turn it off)
_BWRAP_POLL_S = 0.05
_FALLBACK_POLL_S = 0.02


@dataclass
class SandboxResult:
    """What a sandboxed run did.

    ``returncode`` is the child's exit status (negative: killed by that signal; ``None``: could
    not be collected). ``stdout``/``stderr`` are decoded as UTF-8 and cut at the output cap
    (``*_truncated`` says so). ``timed_out`` is True when the wall-clock limit killed the run;
    ``killed`` is True when the run ended by a signal or was killed by the sandbox, ``reason``
    says why (``"timeout"``, ``"output limit"``, ``"disk limit"``, ``"cpu time limit"``,
    ``"file size limit"``, ``"signal SIGKILL"`` ...). ``duration_s`` is the wall-clock time from
    start to exit. ``report`` is what the script wrote to the report channel (``report_channel``).
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed: bool
    reason: str | None
    duration_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    sandbox: str = ""
    uid: int | None = None  # the unprivileged uid it ran as (None: not dropped, parent not root)
    report: str = ""

    @property
    def ok(self) -> bool:
        """The run exited normally with status 0."""
        return self.returncode == 0 and not self.killed


# ----------------------------------------------------------------------------------------------
# The child's programs: standard-library files beside this one (shipped with the package), whose
# source the child's interpreter runs. _sandbox_child.py is the bootstrap, the first code the child
# runs: it sets the limits, drops to the unprivileged uid, starts the supervisor (fallback), applies
# Landlock and seccomp, and only then runs the untrusted file. _sandbox_loader.py is the -c program
# that runs the bootstrap precompiled by this interpreter; _sandbox_probe.py is what the probe of a
# mode runs.

_HERE = os.path.dirname(os.path.abspath(__file__))
_BOOT_PATH = os.path.join(_HERE, "_sandbox_child.py")
_LOADER_PATH = os.path.join(_HERE, "_sandbox_loader.py")
_PROBE_PATH = os.path.join(_HERE, "_sandbox_probe.py")


def _program_source(path: str) -> str:
    """The source of one of the child's programs (a file shipped beside this module)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise RuntimeError(f"nice_kit.metrics.sandbox: cannot read {path} ({err}); it ships with nice_kit, "
                           "reinstall the package") from err


_BOOT = _program_source(_BOOT_PATH)
_BOOT_LOADER = _program_source(_LOADER_PATH)
_PROBE_CODE = _program_source(_PROBE_PATH)


@functools.lru_cache(maxsize=16)
def _compiled(source: str, filename: str, pyc: bool = False) -> bytes:
    """``source`` compiled by this interpreter, marshalled (with a .pyc header when ``pyc``)."""
    import importlib.util
    import marshal

    data = marshal.dumps(compile(source, filename, "exec", dont_inherit=True))
    return importlib.util.MAGIC_NUMBER + b"\0" * 12 + data if pyc else data


_SIGNAL_REASONS = {
    signal.SIGXCPU: "cpu time limit",
    signal.SIGXFSZ: "file size limit",
}

_lock = threading.Lock()
_probes: dict[str, tuple[bool, str]] = {}  # mode -> (works, why not)
_warned = False
_undumpable_count = 0
_undumpable_saved: int | None = None


# ----------------------------------------------------------------------------------------------
# Helpers


def _others_can_search(path: str) -> str | None:
    """The shallowest directory on ``path``'s way that "others" cannot search, or ``None``.

    An unprivileged uid that owns nothing and has no groups is "others" everywhere, so this says
    whether it can reach ``path`` (symlinks resolved; ``path`` itself must be readable).
    """
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    current = os.sep
    for part in parts[1:]:
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return current
        if not mode & stat.S_IXOTH:
            return current
        current = os.path.join(current, part)
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return real
    if not mode & stat.S_IROTH or (stat.S_ISDIR(mode) and not mode & stat.S_IXOTH):
        return real
    return None


@functools.lru_cache(maxsize=8)
def _python_paths(python: str) -> tuple[str, ...]:
    """Directories the interpreter needs: its prefixes, standard library and site-packages."""
    import site
    import sysconfig

    paths = {os.path.dirname(os.path.realpath(python))}
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
            paths.add(p)
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            try:
                paths.add(sysconfig.get_paths()[key])
            except KeyError:
                pass
        try:
            paths.update(site.getsitepackages())
        except AttributeError:
            pass
    out = sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})
    # Drop paths nested in another one.
    return tuple(p for p in out if not any(p != q and p.startswith(q.rstrip(os.sep) + os.sep) for q in out))


def _id_ranges(path: str) -> list[tuple[int, int]]:
    try:
        with open(path) as f:
            rows = [line.split() for line in f if line.strip()]
        return [(int(r[0]), int(r[0]) + int(r[2])) for r in rows]
    except (OSError, ValueError, IndexError):
        return [(0, 2**32 - 1)]


def _pick_id(ranges: list[tuple[int, int]]) -> int | None:
    # High ids, far above login users and the subordinate-id ranges rootless containers use
    # (100000 + 65536 k): the sweep after a run kills every process of the id it drew.
    lo_bound, hi_bound = 2**30, 2**31 - 2
    usable = [(max(a, lo_bound), min(b, hi_bound)) for a, b in ranges]
    usable = [(a, b) for a, b in usable if b - a >= 1000]
    if usable:
        a, b = max(usable, key=lambda r: r[1] - r[0])
        return a + secrets.randbelow(b - a)
    if any(a <= 65534 < b for a, b in ranges):
        return 65534  # nobody: shared with other runs, but still not root
    return None


def _pick_ids() -> tuple[int, int] | None:
    """A fresh unprivileged (uid, gid) for one run, when we are root; ``None`` otherwise."""
    if os.geteuid() != 0:
        return None
    for _ in range(20):
        uid = _pick_id(_id_ranges("/proc/self/uid_map"))
        gid = _pick_id(_id_ranges("/proc/self/gid_map"))
        if uid is None or gid is None:
            raise RuntimeError(
                "running as root but no unprivileged uid/gid is mapped; refusing to run untrusted code as root"
            )
        if uid == 65534 or not (_uid_known(uid) or _processes_of(uid)):
            return uid, gid
    raise RuntimeError("could not find an unused uid for the sandbox")


def _uid_known(uid: int) -> bool:
    try:
        import pwd

        pwd.getpwuid(uid)
        return True
    except (KeyError, ImportError):
        return False


_GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def _processes_of(uid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose real uid is ``uid``; a process that vanishes or
    cannot be read is skipped."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.uids().real == uid and p.status() not in _GONE:
                out.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return out


def _session_members(sid: int) -> list[int]:
    """Pids of live processes in session ``sid``."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() not in _GONE:
                out.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return out


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _sweep(list_processes: Callable[[], list[int]], rounds: int) -> None:
    """Kill what ``list_processes`` returns until it returns nothing (or ``rounds`` pass).

    Used with the run's private uid (we are root) and, as a backstop where no uid was dropped,
    with the run's session."""
    for _ in range(rounds):
        pids = list_processes()
        if not pids:
            return
        _kill_all(pids)
        time.sleep(0.002)


def _count_own_processes() -> int:
    return len(_processes_of(os.getuid())) if os.path.isdir("/proc") else 0  # RLIMIT_NPROC counts them (Linux)


def _tmp_base() -> str:
    base = tempfile.gettempdir()
    if _others_can_search(base) is not None and os.path.isdir("/tmp"):
        base = "/tmp"
    return base


@functools.lru_cache(maxsize=8)
def _fallback_python(python: str, drop_uid: bool) -> tuple[str, list[str]]:
    """An interpreter the unprivileged uid can run, and site directories to add to its path."""
    if not drop_uid or all(_others_can_search(p) is None for p in [python, *_python_paths(python)]):
        return python, []
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    std_path = "/usr/local/bin:/usr/bin:/bin"
    for candidate in (shutil.which(version, path=std_path), shutil.which("python3", path=std_path)):
        if candidate and _others_can_search(candidate) is None:
            site_dirs = []
            if os.path.basename(candidate) == version:
                import site

                site_dirs = [p for p in site.getsitepackages() if _others_can_search(p) is None]
            return candidate, site_dirs
    raise RuntimeError(
        f"no Python interpreter readable by an unprivileged user was found ({python} is not); "
        "install bubblewrap or a system python3"
    )


@functools.lru_cache(maxsize=4)
def _bwrap_options(bwrap: str) -> frozenset[str]:
    """The options this bwrap knows (from its --help), e.g. ``--size`` (0.5) and ``--disable-userns`` (0.8)."""
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(word for word in text.split() if word.startswith("--"))


def _bwrap_command(bwrap: str, python: str, workdir: str, inner: str, disk_bytes: int) -> tuple[list[str], int]:
    """The bwrap command line, and how many inodes its private /tmp holds before the code runs."""
    options = _bwrap_options(bwrap)
    cmd = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() != 0:
        cmd.append("--unshare-user")
        if "--disable-userns" in options:
            cmd.append("--disable-userns")  # the seccomp filter in the bootstrap refuses them as well
    cmd += ["--die-with-parent", "--new-session", "--ro-bind", "/", "/"]
    if "--size" in options:
        cmd += ["--size", str(disk_bytes)]  # older bwrap: the parent's poll enforces the limit
    cmd += ["--perms", "1777", "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    if os.geteuid() == 0:
        # Hide directories the unprivileged uid cannot search anyway (e.g. /root), then bind back the
        # parts of the Python installation under them, with searchable parents.
        hidden: list[str] = []
        binds: list[tuple[str, str]] = []
        for path in _python_paths(python):
            blocked = _others_can_search(path)
            if blocked is None or blocked == path:
                continue  # reachable already, or unreadable itself: binding it back cannot help
            hidden_dir = blocked
            if hidden_dir not in hidden:
                hidden.append(hidden_dir)
            binds.append((hidden_dir, path))
        made: set[str] = set()
        for hidden_dir in hidden:
            cmd += ["--perms", "0755", "--tmpfs", hidden_dir]
        for hidden_dir, path in binds:
            rel = os.path.relpath(path, hidden_dir)
            current = hidden_dir
            for part in rel.split(os.sep)[:-1] if rel != "." else []:
                current = os.path.join(current, part)
                if current not in made:
                    made.add(current)
                    cmd += ["--perms", "0755", "--dir", current]
            cmd += ["--ro-bind", path, path]
    # The private /tmp hides an interpreter or virtual environment that lives under /tmp (a CI
    # checkout, say): bind those parts back, read-only, on searchable parents.
    inodes = 1  # the tmpfs root
    made_tmp: set[str] = set()
    for path in (os.path.abspath(python), *_python_paths(python)):
        if not path.startswith("/tmp/"):
            continue
        target = path if os.path.isdir(path) else os.path.dirname(path)
        current = "/tmp"
        for part in os.path.relpath(target, "/tmp").split(os.sep)[:-1]:
            current = os.path.join(current, part)
            if current not in made_tmp:
                made_tmp.add(current)
                cmd += ["--perms", "0755", "--dir", current]
                inodes += 1
        cmd += ["--ro-bind", target, target]
        inodes += 1
    # The working directory lives in the private /tmp (bounded, never on the host's disk); the
    # script is bound into it read-only from the host's scratch directory.
    cmd += ["--perms", "0777", "--dir", inner]
    scripts = sorted(name for name in os.listdir(workdir) if name.startswith("main."))
    for name in scripts:
        cmd += ["--ro-bind", os.path.join(workdir, name), f"{inner}/{name}"]
    cmd += ["--chdir", inner]
    return cmd, inodes + 1 + len(scripts)


def _env(workdir: str, extra: dict[str, str] | None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def _exited(proc: subprocess.Popen) -> bool:
    """Has the child exited? Does not reap it, so its pid (our process group id) stays reserved."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
    except (AttributeError, OSError):
        return proc.poll() is not None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen, supervised: bool) -> None:
    """Stop a run: ask the supervisor to kill everything the code started, then kill the group."""
    if supervised and not _exited(proc):
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        end = time.monotonic() + 2.0
        while time.monotonic() < end and not _exited(proc):
            time.sleep(0.002)
    _kill_group(proc)


@contextlib.contextmanager
def _parent_undumpable(active: bool):
    """While fallback runs of our own uid are active, make this process non-dumpable: a process of
    the same uid can then neither ptrace it nor read its /proc/<pid>/environ or mem (Linux)."""
    global _undumpable_count, _undumpable_saved
    if not active:
        yield
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with _lock:
        if _undumpable_count == 0:
            _undumpable_saved = libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
            libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
        _undumpable_count += 1
    try:
        yield
    finally:
        with _lock:
            _undumpable_count -= 1
            if _undumpable_count == 0 and _undumpable_saved is not None and _undumpable_saved > 0:
                libc.prctl(4, _undumpable_saved, 0, 0, 0)


def _tree_usage(root: str, max_files: int) -> tuple[int, int]:
    """(bytes allocated, entries) under ``root``; stops counting once past ``max_files``."""
    total, entries = 0, 0
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += getattr(st, "st_blocks", 0) * 512 or st.st_size
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(entry.path)
                    if entries > max_files:
                        return total, entries
        except OSError:
            continue
    return total, entries


def _tree_usage_check(workdir: str, max_bytes: int, max_files: int) -> Callable[[], str | None]:
    """A function that says "disk limit" once the work dir on the host is over its limits."""

    def check() -> str | None:
        used, files = _tree_usage(workdir, max_files)
        return "disk limit" if used > max_bytes or files > max_files else None

    return check


def _tmpfs_usage_check(proc: subprocess.Popen, workdir: str, inner: str, baseline: int, max_bytes: int,
                       max_files: int) -> Callable[[], str | None]:
    """A function that says "disk limit" once bubblewrap's private /tmp (seen through the root of
    the sandbox's first process) holds more than the limits; ``baseline``: inodes it starts with."""
    sandbox_pid: list[int] = []
    host_dev = os.stat(workdir).st_dev

    def check() -> str | None:
        if not sandbox_pid:
            try:
                kids = psutil.Process(proc.pid).children()
            except psutil.Error:
                return None
            if not kids:
                return None
            sandbox_pid.append(kids[0].pid)
        path = f"/proc/{sandbox_pid[0]}/root{inner}"
        try:
            if os.stat(path).st_dev == host_dev:
                return None  # bwrap has not switched to the sandbox's root yet
            st = os.statvfs(path)
        except OSError:
            return None
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        files = st.f_files - st.f_ffree - baseline
        return "disk limit" if used > max_bytes or files > max_files else None

    return check


# ----------------------------------------------------------------------------------------------
# Isolation strategies: what bubblewrap and the supervised fallback do differently. ``_run`` asks
# the strategy for a plan (interpreter, work dir as the code sees it, what the bootstrap sets up),
# then for the command line that starts the bootstrap and the check of the run's disk usage.


@dataclass(frozen=True)
class _Plan:
    """How one run is set up under an isolation strategy."""

    python: str  # the interpreter the child runs
    site_dirs: list[str]  # site directories the bootstrap adds (a system interpreter's)
    inner: str  # the work dir as the code sees it
    fallback: bool  # the bootstrap's fallback seccomp rules (no sockets, no ptrace, signals ...)
    landlock: bool  # the bootstrap applies Landlock where the kernel has it
    supervised: bool  # a supervisor process stands between us and the code (one more process)
    undumpable_parent: bool  # this process is non-dumpable while the run is active
    signal_status: bool  # an exit status of 128 + n reports a death by signal n (bwrap does)
    poll_s: float  # how often the run's disk usage is checked


@dataclass(frozen=True)
class _Launch:
    """The command line that starts a run, extra ``subprocess.Popen`` arguments, and a function
    that, given the started process, returns the check of the run's disk usage."""

    argv: list[str]
    popen_kwargs: dict
    usage_check: Callable[[subprocess.Popen], Callable[[], str | None]]


class _Isolation(Protocol):
    """An isolation strategy (:data:`BUBBLEWRAP` or :data:`RLIMITS_ONLY`)."""

    name: str

    def plan(self, python: str, workdir: str, ids: tuple[int, int] | None) -> _Plan:
        """The plan of a run of ``python`` in ``workdir`` (a fresh host directory), as uid/gid ``ids``."""
        ...

    def launch(self, boot_argv: list[str], plan: _Plan, workdir: str, disk_bytes: int, max_files: int,
               ids: tuple[int, int] | None) -> _Launch:
        """How to start ``boot_argv`` (the interpreter running the bootstrap) under this strategy."""
        ...


@dataclass(frozen=True)
class _Bubblewrap:
    """bwrap's namespaces: read-only ``/``, a private tmpfs ``/tmp`` holding the work dir, a fresh
    ``/proc``, no network; the bootstrap drops to the uid inside."""

    name: str = BUBBLEWRAP

    def plan(self, python: str, workdir: str, ids: tuple[int, int] | None) -> _Plan:
        return _Plan(python=python, site_dirs=[], inner=f"/tmp/{os.path.basename(workdir)}", fallback=False,
                     landlock=False, supervised=False, undumpable_parent=False, signal_status=True,
                     poll_s=_BWRAP_POLL_S)

    def launch(self, boot_argv: list[str], plan: _Plan, workdir: str, disk_bytes: int, max_files: int,
               ids: tuple[int, int] | None) -> _Launch:
        prefix, baseline = _bwrap_command(shutil.which("bwrap") or "bwrap", plan.python, workdir, plan.inner, disk_bytes)
        return _Launch(prefix + boot_argv, {},
                       lambda proc: _tmpfs_usage_check(proc, workdir, plan.inner, baseline, disk_bytes, max_files))


@dataclass(frozen=True)
class _SupervisedFallback:
    """A plain process of this kernel: the supervisor, Landlock and the stricter seccomp filter on
    Linux, the random uid as root (set by ``Popen``), the work dir on the host, polled."""

    name: str = RLIMITS_ONLY

    def plan(self, python: str, workdir: str, ids: tuple[int, int] | None) -> _Plan:
        python, site_dirs = _fallback_python(python, ids is not None)
        return _Plan(python=python, site_dirs=site_dirs, inner=workdir, fallback=True, landlock=_LANDLOCK,
                     supervised=_LINUX, undumpable_parent=_LINUX and ids is None, signal_status=False,
                     poll_s=_FALLBACK_POLL_S)

    def launch(self, boot_argv: list[str], plan: _Plan, workdir: str, disk_bytes: int, max_files: int,
               ids: tuple[int, int] | None) -> _Launch:
        kwargs = {"user": ids[0], "group": ids[1], "extra_groups": []} if ids is not None else {}
        return _Launch(boot_argv, kwargs, lambda proc: _tree_usage_check(workdir, disk_bytes, max_files))


_ISOLATIONS: dict[str, _Isolation] = {BUBBLEWRAP: _Bubblewrap(), RLIMITS_ONLY: _SupervisedFallback()}


# ----------------------------------------------------------------------------------------------
# Running


def _run(
    code: str,
    mode: str,
    *,
    timeout_s: float,
    memory_mb: int,
    max_processes: int,
    max_file_mb: float,
    max_disk_mb: float,
    max_files: int,
    max_open_files: int,
    max_output_bytes: int,
    stdin: str | bytes | None,
    env: dict[str, str] | None,
    python: str | None,
    report_channel: bool = False,
) -> SandboxResult:
    if os.name != "posix":
        raise RuntimeError("run_untrusted needs a POSIX system")
    isolation = _ISOLATIONS[mode]
    python = python or sys.executable
    ids = _pick_ids()
    disk_bytes = max(int(max_disk_mb * 1024 * 1024), 65536)
    workdir = tempfile.mkdtemp(prefix="nice-sandbox-", dir=_tmp_base())
    proc = None
    plan = None
    report_r = report_w = None
    try:
        plan = isolation.plan(python, workdir, ids)
        nproc = max_processes + (1 if plan.supervised else 0)  # + the supervisor
        if ids is None:  # not root: the limit counts all of this user's processes
            nproc += _count_own_processes()
        rlimits = [
            ("RLIMIT_CPU", max(1, math.ceil(timeout_s)) + 1),
            ("RLIMIT_AS", int(memory_mb) * 1024 * 1024),
            ("RLIMIT_NPROC", int(nproc)),
            ("RLIMIT_FSIZE", min(int(max_file_mb * 1024 * 1024), disk_bytes)),
            ("RLIMIT_NOFILE", int(max_open_files)),
            ("RLIMIT_CORE", 0),
        ]
        same_python = os.path.realpath(plan.python) == os.path.realpath(sys.executable)
        script = "main.py"
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if same_python:  # precompiled (cached): the source stays next to it for tracebacks
            script = "main.pyc"
            with open(os.path.join(workdir, script), "wb") as f:
                f.write(_compiled(code, "main.py", pyc=True))
        for name in os.listdir(workdir):
            os.chmod(os.path.join(workdir, name), 0o644)
        if ids is not None:
            os.chown(workdir, ids[0], ids[1])
        os.chmod(workdir, 0o700)
        if report_channel:
            report_r, report_w = os.pipe()
        cfg = {
            "rlimits": rlimits,
            "uid": ids[0] if ids else None,
            "gid": ids[1] if ids else None,
            "site": plan.site_dirs,
            "script": f"{plan.inner}/{script}",
            "workdir": plan.inner,
            "report_fd": report_w,
            "fallback": plan.fallback,
            "supervise": plan.supervised,
            "landlock": plan.landlock,
            "parent": os.getpid(),
        }
        if same_python:  # the bootstrap precompiled (cached) too
            argv = [plan.python, "-I", "-B", "-c", _BOOT_LOADER, _compiled(_BOOT, "<nice-sandbox-boot>").hex(),
                    json.dumps(cfg)]
        else:
            argv = [plan.python, "-I", "-B", "-c", _BOOT, json.dumps(cfg)]
        launch = isolation.launch(argv, plan, workdir, disk_bytes, int(max_files), ids)
        data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin

        with _parent_undumpable(plan.undumpable_parent):
            start = time.monotonic()
            proc = subprocess.Popen(
                launch.argv,
                stdin=subprocess.PIPE if data else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=_env(plan.inner, env),
                start_new_session=True,
                close_fds=True,
                pass_fds=(report_w,) if report_w is not None else (),
                **launch.popen_kwargs,
            )
            if report_w is not None:
                os.close(report_w)
                report_w = None
            out, err, rep, trunc_out, trunc_err, reason = _communicate(
                proc, data, start + timeout_s, max_output_bytes, report_r, launch.usage_check(proc), plan.poll_s
            )
            if reason is not None:
                _stop(proc, plan.supervised)
            _kill_group(proc)  # stragglers in the group; the group id is still reserved (not reaped)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
                pass
            duration = time.monotonic() - start
    finally:
        supervised = plan is not None and plan.supervised
        if proc is not None and proc.returncode is None:
            _stop(proc, supervised)
            try:
                proc.kill()
                proc.wait(timeout=5)
            except Exception:  # pragma: no cover
                pass
        if ids is not None:
            _sweep(lambda: _processes_of(ids[0]), 200)
        elif proc is not None and supervised:
            _sweep(lambda: _session_members(proc.pid), 50)
        if proc is not None:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        for fd in (report_r, report_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        shutil.rmtree(workdir, ignore_errors=True)

    rc = proc.returncode
    if reason is None and rc is not None:
        sig = None
        if rc < 0:
            sig = -rc
        elif plan.signal_status and rc > 128:  # bwrap reports a signal death as 128 + signal
            sig = rc - 128
        if sig is not None:
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            reason = _SIGNAL_REASONS.get(sig, f"signal {name}")
    return SandboxResult(
        returncode=rc,
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        timed_out=reason == "timeout",
        killed=reason is not None,
        reason=reason,
        duration_s=duration,
        stdout_truncated=trunc_out,
        stderr_truncated=trunc_err,
        sandbox=isolation.name,
        uid=ids[0] if ids else None,
        report=rep.decode("utf-8", errors="replace"),
    )


def _communicate(proc, data, deadline, cap, report_fd=None, check_usage=None, poll_s=0.1):
    """Feed stdin, read stdout/stderr (and the report channel) up to ``cap`` bytes each, until
    exit, timeout, overflow or a disk limit."""
    sel = selectors.DefaultSelector()
    fds = [proc.stdout.fileno(), proc.stderr.fileno()] + ([report_fd] if report_fd is not None else [])
    bufs = {fd: bytearray() for fd in fds}
    truncated = dict.fromkeys(bufs, False)
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    view, pos = memoryview(data or b""), 0
    if proc.stdin is not None:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    reason = None
    exited_at = None
    next_check = time.monotonic() + poll_s
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                reason = "timeout"
                break
            if check_usage is not None and now >= next_check:
                next_check = now + poll_s
                reason = check_usage()
                if reason is not None:
                    break
            if exited_at is None and _exited(proc):
                exited_at = now
            if exited_at is not None and now - exited_at > 0.2:
                break  # the main process is gone; something it left behind holds the pipes
            wait = min(deadline - now, poll_s if check_usage is not None else 0.1)
            for key, _ in sel.select(max(wait, 0.0)):
                fd = key.fd
                if fd in bufs:
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(fd)
                        continue
                    buf = bufs[fd]
                    room = cap - len(buf)
                    buf += chunk[: max(room, 0)]
                    if len(chunk) > room:
                        truncated[fd] = True
                        reason = "output limit"
                else:
                    try:
                        pos += os.write(fd, view[pos : pos + 65536])
                    except (BrokenPipeError, OSError):
                        pos = len(view)
                    if pos >= len(view):
                        sel.unregister(fd)
                        proc.stdin.close()
            if reason is not None:
                break
    finally:
        sel.close()
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
    out_fd, err_fd = fds[0], fds[1]
    report = bytes(bufs[report_fd]) if report_fd is not None else b""
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), report, truncated[out_fd], truncated[err_fd], reason


def _probe(mode: str) -> tuple[bool, str]:
    """Does ``mode`` work here? For the fallback, the second item lists what the bootstrap set up."""
    with _lock:
        if mode in _probes:
            return _probes[mode]
    if mode == BUBBLEWRAP and not shutil.which("bwrap"):
        result = (False, "bwrap not found on PATH")
    else:
        try:
            r = _run(
                _PROBE_CODE,
                mode,
                timeout_s=30.0,
                memory_mb=512,
                max_processes=8,
                max_file_mb=1,
                max_disk_mb=1,
                max_files=16,
                max_open_files=64,
                max_output_bytes=10_000,
                stdin=None,
                env=None,
                python=None,
            )
            words = r.stdout.split(maxsplit=2)
            works = r.ok and len(words) == 3 and words[0] == "nice-sandbox-ok"
            if works and os.geteuid() == 0 and words[1] == "0":
                works = False
                r.stderr += "\nthe sandboxed process still ran as root"
            detail = words[2].strip() if works else (r.stderr.strip()[-2000:] or f"exit status {r.returncode}")
            result = (works, detail)
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            result = (False, f"{type(err).__name__}: {err}")
    with _lock:
        _probes[mode] = result
    return result


def _fallback_features() -> dict:
    """What the rlimits-only fallback sets up on this machine: ``landlock`` (ABI, 0: none),
    ``seccomp`` and ``supervisor`` (bools), ``own_uid`` (True: it keeps this user's uid)."""
    works, detail = _probe(RLIMITS_ONLY)
    features = {"landlock": 0, "seccomp": False, "supervisor": False}
    if works:
        try:
            features.update(json.loads(detail))
        except (ValueError, TypeError):
            pass
    features["own_uid"] = os.geteuid() != 0
    features["works"] = works
    return features


def _fallback_warning(features: dict) -> str:
    has, lacks = [], []
    has.append("resource limits, a clean environment, a new session")
    has.append("a random unprivileged uid" if not features["own_uid"] else "no uid change (not root)")
    if features["supervisor"]:
        has.append("a supervisor that kills every process the code starts, daemons included")
    else:
        lacks.append("daemons that leave the process group may survive the run")
    if features["landlock"]:
        has.append(f"Landlock ABI {features['landlock']} (writes only in its work dir, no access to other processes"
                   + (", no TCP" if features["landlock"] >= 4 else "")
                   + (", no signals out" if features["landlock"] >= 6 else "") + ")")
    else:
        lacks.append("no Landlock: it can write wherever its uid can write"
                     + (" (all of your files)" if features["own_uid"] else " (world-writable places)"))
    if features["seccomp"]:
        has.append("seccomp (no sockets, no ptrace, no new user namespaces"
                   + (")" if features["landlock"] >= 6 else ", signals only to itself and its group)"))
    else:
        lacks.append("no seccomp: it can open network connections" + (" (not TCP)" if features["landlock"] >= 4 else "")
                     + ("" if features["landlock"] >= 6 else " and signal processes of its uid"))
    if features["own_uid"]:
        lacks.append("it runs as your own user: it can READ every file you can read (keys, tokens) and see your "
                     "processes" + ("; this process is made non-dumpable while it runs, your other processes are not"
                                    if _LINUX else ", read their memory and environment, and signal them"))
    else:
        lacks.append("it can read world-readable files")
    lacks.append("its work dir is on the host disk, size checked every 20 ms")
    return (
        "nice_kit.metrics.sandbox: running untrusted code without bubblewrap (not installed, not working, "
        "or isolation='rlimits-only' asked for). Isolation is weaker. It has: " + "; ".join(has)
        + ". What remains: " + "; ".join(lacks) + ". Install bubblewrap (apt-get install bubblewrap) "
        "for a read-only filesystem, private /proc and /tmp, and no network."
    )


def _warn_fallback() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(_fallback_warning(_fallback_features()), RuntimeWarning, stacklevel=3)


def _resolve(isolation: str) -> str:
    if isolation == "auto":
        return BUBBLEWRAP if _probe(BUBBLEWRAP)[0] else RLIMITS_ONLY
    if isolation in (BUBBLEWRAP, "bwrap"):
        works, why = _probe(BUBBLEWRAP)
        if not works:
            raise RuntimeError(f"bubblewrap sandbox does not work here: {why}")
        return BUBBLEWRAP
    if isolation in (RLIMITS_ONLY, "rlimits"):
        return RLIMITS_ONLY
    raise ValueError(f"isolation must be 'auto', 'bubblewrap' or 'rlimits-only', not {isolation!r}")


def sandbox_kind() -> str:
    """The sandbox :func:`run_untrusted` uses by default: ``"bubblewrap"`` or ``"rlimits-only"``."""
    return _resolve("auto")


def run_untrusted(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_processes: int = 8,
    max_file_mb: float = 1,
    max_disk_mb: float = 16,
    max_files: int = 1000,
    max_open_files: int = 64,
    max_output_bytes: int = 128 * 1024,
    stdin: str | bytes | None = None,
    env: dict[str, str] | None = None,
    isolation: str = "auto",
    python: str | None = None,
    report_channel: bool = False,
) -> SandboxResult:
    """Run the Python source ``code`` in a sandboxed child process and return what it did.

    ``timeout_s``: wall-clock limit (CPU time is limited to about the same). ``memory_mb``: address
    space per process. ``max_processes``: processes and threads of the run's uid (as root; the
    interpreter itself counts). ``max_file_mb``: largest file it may write. ``max_disk_mb`` and
    ``max_files``: total size and number of the files and directories it may create (its work dir
    and /tmp together). ``max_open_files``: file descriptors. ``max_output_bytes``: cap on each of
    stdout, stderr and the report; a run that prints more is killed. ``stdin``: data fed to its
    standard input. ``env``: extra environment variables (nothing else from the parent's environment
    is passed). ``isolation``: ``"auto"`` (bubblewrap when it works, else the rlimits-only fallback,
    with a warning), ``"bubblewrap"`` (fail if it does not work) or ``"rlimits-only"``. ``python``:
    the interpreter (default: this one). ``report_channel``: give the script file descriptor 3, a
    pipe only it holds; what it writes there comes back in :attr:`SandboxResult.report` (close it
    before running code that must not write there: forked children inherit it).
    """
    mode = _resolve(isolation)
    if mode == RLIMITS_ONLY:
        _warn_fallback()
    if max_disk_mb <= 0 or max_files <= 0:
        raise ValueError(f"max_disk_mb and max_files must be positive, not {max_disk_mb!r} and {max_files!r}")
    return _run(
        code,
        mode,
        timeout_s=float(timeout_s),
        memory_mb=int(memory_mb),
        max_processes=int(max_processes),
        max_file_mb=max_file_mb,
        max_disk_mb=float(max_disk_mb),
        max_files=int(max_files),
        max_open_files=int(max_open_files),
        max_output_bytes=int(max_output_bytes),
        stdin=stdin,
        env=env,
        python=python,
        report_channel=bool(report_channel),
    )
