"""Run untrusted Python code (model completions) in a separate, limited process.

:func:`run_untrusted` runs a piece of Python source in a child process and returns a
:class:`SandboxResult`. Every run gets

* a fresh temporary working directory, removed afterwards;
* a scrubbed environment (``PATH``, ``LANG``, ``HOME``/``TMPDIR`` pointing at the working
  directory, thread counts of 1): nothing from the parent's environment reaches the child;
* resource limits set before the untrusted code starts: CPU time, address space (memory), number
  of processes, size of written files, open files, no core dumps;
* an unprivileged uid when the parent runs as root (RLIMIT_NPROC does not bind uid 0). A random
  uid is drawn per run, so that concurrent runs do not share a process count and every process the
  run left behind can be found by its uid and killed;
* a wall-clock timeout after which the whole process group (and everything running under the
  run's uid) is killed, and a cap on captured stdout/stderr (a run that prints more is killed).

With bubblewrap (``bwrap``) installed and working, the child also runs in its own mount, pid,
network, ipc and uts namespaces: a read-only view of ``/`` (only the working directory is
writable), a private ``/tmp``, a fresh ``/proc`` showing only its own processes, a minimal
``/dev``, no network at all, and ``no_new_privs``. Directories that the unprivileged uid could not
read anyway (such as ``/root``) are replaced by empty ones, except for the Python installation the
child needs. :func:`sandbox_kind` says which kind of sandbox is in use: ``"bubblewrap"`` or
``"rlimits-only"``. The fallback has no filesystem or network isolation (the child can read what
the unprivileged uid can read, write world-writable places and open network connections) and
warns once that isolation is weaker.

Known limits: memory is limited per process (a run may use up to ``max_processes * memory_mb``);
the sandbox can read world-readable files; when the parent is not root, no uid is dropped (the
process limit then counts the user's own processes) and leftover processes that left the process
group are not swept.
"""

from __future__ import annotations

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

__all__ = ["SandboxResult", "run_untrusted", "sandbox_kind", "BUBBLEWRAP", "RLIMITS_ONLY"]

BUBBLEWRAP = "bubblewrap"
RLIMITS_ONLY = "rlimits-only"


@dataclass
class SandboxResult:
    """What a sandboxed run did.

    ``returncode`` is the child's exit status (negative: killed by that signal; ``None``: could
    not be collected). ``stdout``/``stderr`` are decoded as UTF-8 and cut at the output cap
    (``*_truncated`` says so). ``timed_out`` is True when the wall-clock limit killed the run;
    ``killed`` is True when the run ended by a signal or was killed by the sandbox, ``reason``
    says why (``"timeout"``, ``"output limit"``, ``"cpu time limit"``, ``"file size limit"``,
    ``"signal SIGKILL"`` ...). ``duration_s`` is the wall-clock time from start to exit.
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

    @property
    def ok(self) -> bool:
        """The run exited normally with status 0."""
        return self.returncode == 0 and not self.killed


# ----------------------------------------------------------------------------------------------
# The bootstrap: the first Python code the child runs. It is ours (trusted): it sets the limits,
# drops to the unprivileged uid, and only then runs the untrusted file.

_BOOT = r"""
import json, os, resource, sys
_c = json.loads(sys.argv[1])
for _name, _value in _c["rlimits"]:
    _which = getattr(resource, _name, None)
    if _which is None:
        continue
    _soft, _hard = resource.getrlimit(_which)
    if _hard != resource.RLIM_INFINITY and _value > _hard:
        _value = _hard
    try:
        resource.setrlimit(_which, (_value, _value))
    except (ValueError, OSError):
        if sys.platform.startswith("linux"):
            raise
        # macOS refuses some limits (RLIMIT_AS): the run goes on without that one
if _c["uid"] is not None and os.geteuid() == 0:
    os.setgroups([])
    os.setresgid(_c["gid"], _c["gid"], _c["gid"])
    os.setresuid(_c["uid"], _c["uid"], _c["uid"])
    if 0 in os.getresuid() or 0 in os.getresgid():
        os._exit(125)
if _c["nnp"]:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
if _c["site"]:
    import site
    for _p in _c["site"]:
        site.addsitedir(_p)
os.umask(0o077)
_script = _c["script"]
sys.argv = [_script]
del _c, _name, _value, _which, _soft, _hard
import runpy
runpy.run_path(_script, run_name="__main__")
"""

_RLIMIT_NAMES = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE")

_SIGNAL_REASONS = {
    signal.SIGXCPU: "cpu time limit",
    signal.SIGXFSZ: "file size limit",
}

_lock = threading.Lock()
_probes: dict[str, tuple[bool, str]] = {}  # mode -> (works, why not)
_warned = False


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


def _processes_of(uid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose real uid is ``uid`` (Linux; [] elsewhere)."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                text = f.read()
        except OSError:
            continue
        state = uid_line = None
        for line in text.splitlines():
            if line.startswith("State:"):
                state = line.split()[1]
            elif line.startswith("Uid:"):
                uid_line = line.split()
                break
        if uid_line and int(uid_line[1]) == uid and state not in ("Z", "X"):
            out.append(int(name))
    return out


def _sweep(uid: int) -> None:
    """Kill every process running under the run's private uid (we are root)."""
    for _ in range(200):
        pids = _processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.002)


def _count_own_processes() -> int:
    return len(_processes_of(os.getuid())) if os.path.isdir("/proc") else 0


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


def _bwrap_command(bwrap: str, python: str, workdir: str) -> list[str]:
    cmd = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() != 0:
        cmd.append("--unshare-user")
    cmd += ["--die-with-parent", "--new-session", "--ro-bind", "/", "/", "--perms", "1777", "--tmpfs", "/tmp"]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
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
        cmd += ["--ro-bind", target, target]
    cmd += ["--bind", workdir, workdir, "--chdir", workdir]
    return cmd


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
    max_open_files: int,
    max_output_bytes: int,
    stdin: str | bytes | None,
    env: dict[str, str] | None,
    python: str | None,
) -> SandboxResult:
    if os.name != "posix":
        raise RuntimeError("run_untrusted needs a POSIX system")
    python = python or sys.executable
    ids = _pick_ids()
    site_dirs: list[str] = []
    if mode == RLIMITS_ONLY:
        python, site_dirs = _fallback_python(python, ids is not None)

    nproc = max_processes
    if ids is None:  # not root: the limit counts all of this user's processes
        nproc = _count_own_processes() + max_processes
    rlimits = [
        ("RLIMIT_CPU", max(1, math.ceil(timeout_s)) + 1),
        ("RLIMIT_AS", int(memory_mb) * 1024 * 1024),
        ("RLIMIT_NPROC", int(nproc)),
        ("RLIMIT_FSIZE", int(max_file_mb * 1024 * 1024)),
        ("RLIMIT_NOFILE", int(max_open_files)),
        ("RLIMIT_CORE", 0),
    ]
    workdir = tempfile.mkdtemp(prefix="nice-sandbox-", dir=_tmp_base())
    proc = None
    try:
        script = os.path.join(workdir, "main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        os.chmod(script, 0o644)
        if ids is not None:
            os.chown(workdir, ids[0], ids[1])
        os.chmod(workdir, 0o700)
        cfg = {
            "rlimits": rlimits,
            "uid": ids[0] if ids else None,
            "gid": ids[1] if ids else None,
            "nnp": mode == RLIMITS_ONLY and sys.platform.startswith("linux"),
            "site": site_dirs,
            "script": script,
        }
        argv = [python, "-I", "-B", "-c", _BOOT, json.dumps(cfg)]
        kwargs: dict = {}
        if mode == BUBBLEWRAP:
            argv = _bwrap_command(shutil.which("bwrap") or "bwrap", python, workdir) + argv
        elif ids is not None:
            kwargs = {"user": ids[0], "group": ids[1], "extra_groups": []}
        data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin

        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if data else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_env(workdir, env),
            start_new_session=True,
            close_fds=True,
            **kwargs,
        )
        out, err, trunc_out, trunc_err, reason = _communicate(proc, data, start + timeout_s, max_output_bytes)
        _kill_group(proc)  # stragglers in the group; the group id is still reserved (not reaped)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            pass
        duration = time.monotonic() - start
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc)
            try:
                proc.kill()
                proc.wait(timeout=5)
            except Exception:  # pragma: no cover
                pass
        if ids is not None:
            _sweep(ids[0])
        if proc is not None:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        shutil.rmtree(workdir, ignore_errors=True)

    rc = proc.returncode
    if reason is None and rc is not None:
        sig = None
        if rc < 0:
            sig = -rc
        elif mode == BUBBLEWRAP and rc > 128:  # bwrap reports a signal death as 128 + signal
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
        sandbox=mode,
        uid=ids[0] if ids else None,
    )


def _communicate(proc, data, deadline, cap):
    """Feed stdin, read stdout/stderr up to ``cap`` bytes each, until exit, timeout or overflow."""
    sel = selectors.DefaultSelector()
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    truncated = dict.fromkeys(bufs, False)
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    view, pos = memoryview(data or b""), 0
    if proc.stdin is not None:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    reason = None
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                reason = "timeout"
                break
            if exited_at is None and _exited(proc):
                exited_at = now
            if exited_at is not None and now - exited_at > 0.2:
                break  # the main process is gone; something it left behind holds the pipes
            for key, _ in sel.select(min(deadline - now, 0.1)):
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
    if reason is not None:
        _kill_group(proc)
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), truncated[out_fd], truncated[err_fd], reason


def _probe(mode: str) -> tuple[bool, str]:
    with _lock:
        if mode in _probes:
            return _probes[mode]
    if mode == BUBBLEWRAP and not shutil.which("bwrap"):
        result = (False, "bwrap not found on PATH")
    else:
        try:
            r = _run(
                "import os\nprint('nice-sandbox-ok', os.getuid())\n",
                mode,
                timeout_s=30.0,
                memory_mb=512,
                max_processes=8,
                max_file_mb=1,
                max_open_files=64,
                max_output_bytes=10_000,
                stdin=None,
                env=None,
                python=None,
            )
            words = r.stdout.split()
            works = r.ok and len(words) == 2 and words[0] == "nice-sandbox-ok"
            if works and os.geteuid() == 0 and words[1] == "0":
                works = False
                r.stderr += "\nthe sandboxed process still ran as root"
            result = (works, "" if works else (r.stderr.strip()[-2000:] or f"exit status {r.returncode}"))
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            result = (False, f"{type(err).__name__}: {err}")
    with _lock:
        _probes[mode] = result
    return result


def _warn_fallback() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        "nice_kit.metrics.sandbox: running untrusted code without bubblewrap (not installed, not working, "
        "or isolation='rlimits-only' asked for). Isolation is weaker: resource limits, a temporary "
        "directory and (as root) an unprivileged uid only; there is NO "
        "filesystem or network isolation (it can read what any user can read, write world-writable "
        "places and open network connections). Install bubblewrap (apt-get install bubblewrap) "
        "for stronger isolation.",
        RuntimeWarning,
        stacklevel=3,
    )


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
    max_open_files: int = 64,
    max_output_bytes: int = 128 * 1024,
    stdin: str | bytes | None = None,
    env: dict[str, str] | None = None,
    isolation: str = "auto",
    python: str | None = None,
) -> SandboxResult:
    """Run the Python source ``code`` in a sandboxed child process and return what it did.

    ``timeout_s``: wall-clock limit (CPU time is limited to about the same). ``memory_mb``: address
    space per process. ``max_processes``: processes and threads of the run's uid (as root; the
    interpreter itself counts). ``max_file_mb``: largest file it may write. ``max_open_files``:
    file descriptors. ``max_output_bytes``: cap on each of stdout and stderr; a run that prints
    more is killed. ``stdin``: data fed to its standard input. ``env``: extra environment
    variables (nothing else from the parent's environment is passed). ``isolation``: ``"auto"``
    (bubblewrap when it works, else the rlimits-only fallback, with a warning), ``"bubblewrap"``
    (fail if it does not work) or ``"rlimits-only"``. ``python``: the interpreter (default: this
    one).
    """
    mode = _resolve(isolation)
    if mode == RLIMITS_ONLY:
        _warn_fallback()
    return _run(
        code,
        mode,
        timeout_s=float(timeout_s),
        memory_mb=int(memory_mb),
        max_processes=int(max_processes),
        max_file_mb=max_file_mb,
        max_open_files=int(max_open_files),
        max_output_bytes=int(max_output_bytes),
        stdin=stdin,
        env=env,
        python=python,
    )
