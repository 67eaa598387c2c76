"""The sandbox for untrusted code: limits, isolation, cleanup, and the weaker fallback."""

from __future__ import annotations

import os
import shutil
import socket
import time
import warnings

import pytest

from nice_kit.metrics import sandbox
from nice_kit.metrics.sandbox import run_untrusted, sandbox_kind

TIMEOUT = 2.0
MARGIN = 2.0  # start-up and clean-up on a busy 2-core machine

HAVE_BWRAP = shutil.which("bwrap") is not None
# bwrap installed but not working (e.g. a container without namespaces) fails test_sandbox_kind only.
BWRAP_WORKS = HAVE_BWRAP and sandbox._probe("bubblewrap")[0]
IS_ROOT = os.geteuid() == 0
needs_bwrap = pytest.mark.skipif(not BWRAP_WORKS, reason="bubblewrap (bwrap) is not installed or does not work")

MODES = [pytest.param("bubblewrap", marks=needs_bwrap), "rlimits-only"]


@pytest.fixture(autouse=True)
def _quiet_fallback_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="nice_kit.metrics.sandbox: running untrusted code without bubblewrap")
        yield


def _no_leftovers(result) -> bool:
    if result.uid is None:
        return True
    for _ in range(100):
        if not sandbox._processes_of(result.uid):
            return True
        time.sleep(0.02)
    return False


def test_sandbox_kind():
    kind = sandbox_kind()
    assert kind in ("bubblewrap", "rlimits-only")
    if HAVE_BWRAP:  # installed (CI installs it): it must work
        assert kind == "bubblewrap", f"bwrap is installed but does not work: {sandbox._probes}"


@pytest.mark.parametrize("mode", MODES)
def test_runs_code_and_reports(mode):
    r = run_untrusted("import sys\nprint('hi')\nprint('err', file=sys.stderr)\n", isolation=mode)
    assert r.ok and r.returncode == 0 and not r.timed_out and not r.killed
    assert r.stdout == "hi\n" and r.stderr == "err\n"
    assert r.sandbox == mode
    assert r.duration_s < 5

    r = run_untrusted("raise SystemExit(3)", isolation=mode)
    assert r.returncode == 3 and not r.killed and not r.ok
    r = run_untrusted("1 / 0", isolation=mode)
    assert r.returncode == 1 and "ZeroDivisionError" in r.stderr

    r = run_untrusted("import sys\nprint(sys.stdin.read()[::-1])", stdin="abc", isolation=mode)
    assert r.stdout.strip() == "cba"


@pytest.mark.parametrize("mode", MODES)
def test_unprivileged_and_scrubbed(mode, monkeypatch, tmp_path):
    secret = "nice-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("NICE_SECRET", secret)
    code = (
        "import os, glob\n"
        "print(dict(os.environ))\n"
        "for p in glob.glob('/proc/*/environ'):\n"
        "    try: print(open(p, 'rb').read())\n"
        "    except OSError: pass\n"
        "st = open('/proc/self/status').read()\n"
        "print('UID', os.getuid(), os.geteuid())\n"
        "print([l for l in st.splitlines() if l.startswith(('CapEff', 'CapPrm', 'NoNewPrivs'))])\n"
        "print('CWD', os.getcwd())\n"
    )
    r = run_untrusted(code, isolation=mode)
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout and secret not in r.stderr
    assert "NICE_SECRET" not in r.stdout
    if IS_ROOT:
        assert "UID 0" not in r.stdout and r.uid is not None and f"UID {r.uid} {r.uid}" in r.stdout
        assert "CapEff:\\t0000000000000000" in r.stdout and "CapPrm:\\t0000000000000000" in r.stdout
    if mode == "bubblewrap":
        assert "NoNewPrivs:\\t1" in r.stdout
    workdir = r.stdout.split("CWD ")[1].strip()
    assert not os.path.exists(workdir)  # the temporary working directory is removed


@pytest.mark.parametrize("mode", MODES)
def test_timeout_kills(mode):
    t = time.monotonic()
    r = run_untrusted("while True:\n    pass\n", timeout_s=TIMEOUT, isolation=mode)
    elapsed = time.monotonic() - t
    assert r.timed_out and r.killed and r.reason == "timeout"
    assert elapsed < TIMEOUT + MARGIN
    assert _no_leftovers(r)


@pytest.mark.parametrize("mode", MODES)
def test_memory_limit(mode):
    t = time.monotonic()
    r = run_untrusted("x = bytearray(10 * 1024 ** 3)\nprint('allocated')", timeout_s=TIMEOUT, isolation=mode)
    assert "MemoryError" in r.stderr and "allocated" not in r.stdout
    assert time.monotonic() - t < TIMEOUT + MARGIN
    r = run_untrusted("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 ** 2))", timeout_s=TIMEOUT, isolation=mode)
    assert "MemoryError" in r.stderr and not r.timed_out


@pytest.mark.parametrize("mode", MODES)
def test_output_is_capped(mode):
    t = time.monotonic()
    r = run_untrusted("while True:\n    print('x' * 10000)\n", timeout_s=TIMEOUT, max_output_bytes=50_000, isolation=mode)
    elapsed = time.monotonic() - t
    assert r.killed and r.reason == "output limit" and r.stdout_truncated
    assert len(r.stdout.encode()) <= 50_000
    assert elapsed < TIMEOUT  # killed as soon as the cap is reached, not at the timeout
    r = run_untrusted("import sys\nsys.stderr.write('e' * 3_000_000)", max_output_bytes=1000, isolation=mode)
    assert r.stderr_truncated and len(r.stderr) == 1000


@pytest.mark.parametrize("mode", MODES)
def test_process_limit_holds_and_nothing_is_left(mode):
    if not IS_ROOT:
        pytest.skip("the per-run uid (and so the process limit) needs root")
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(100):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('fork refused', e.errno)\n"
        "print('forked', n, flush=True)\n"
    )
    t = time.monotonic()
    r = run_untrusted(code, timeout_s=10, max_processes=8, isolation=mode)
    assert "fork refused" in r.stdout
    forked = int(r.stdout.split("forked")[1].split()[0])
    assert forked < 8
    assert not r.timed_out and time.monotonic() - t < 5  # children holding the pipes do not delay it
    assert _no_leftovers(r)  # the sleeping children were killed


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb(mode):
    if not IS_ROOT:
        pytest.skip("the per-run uid (and so the process limit) needs root")
    t = time.monotonic()
    r = run_untrusted(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        timeout_s=1.5,
        max_processes=8,
        isolation=mode,
    )
    assert r.timed_out
    assert time.monotonic() - t < 1.5 + MARGIN
    assert _no_leftovers(r)


@pytest.mark.parametrize("mode", MODES)
def test_file_size_limit(mode):
    code = (
        "data = b'x' * (5 * 1024 * 1024)\n"
        "try:\n"
        "    with open('big', 'wb') as f:\n"
        "        f.write(data)\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n"
        "import os\nprint('size', os.path.getsize('big'))\n"
    )
    r = run_untrusted(code, max_file_mb=1, isolation=mode)
    assert "refused" in r.stdout
    assert int(r.stdout.split("size")[1]) <= 1024 * 1024


@pytest.mark.parametrize("mode", MODES)
def test_cannot_touch_files_outside(mode, tmp_path, monkeypatch):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "existing.txt").write_text("x")
    monkeypatch.chdir(cwd)
    before = sorted(os.listdir(cwd)), sorted(os.listdir(tmp_path))
    code = (
        "import os, shutil\n"
        f"for action in [lambda: os.remove({str(sentinel)!r}),\n"
        f"               lambda: open({str(tmp_path / 'new.txt')!r}, 'w').write('x'),\n"
        f"               lambda: open({str(cwd / 'new.txt')!r}, 'w').write('x'),\n"
        f"               lambda: shutil.rmtree({str(cwd)!r}),\n"
        "               lambda: open('/work/nice-sandbox-escape', 'w').write('x')]:\n"
        "    try:\n"
        "        action()\n"
        "        print('DONE')\n"
        "    except OSError as e:\n"
        "        print('refused', e)\n"
    )
    r = run_untrusted(code, isolation=mode)
    assert r.returncode == 0, r.stderr
    assert sentinel.read_text() == "keep me"
    assert (sorted(os.listdir(cwd)), sorted(os.listdir(tmp_path))) == before
    assert not os.path.exists("/work/nice-sandbox-escape")
    assert "DONE" not in r.stdout


@needs_bwrap
def test_bubblewrap_read_only_root_and_private_tmp():
    name = "nice-sandbox-probe-" + os.urandom(6).hex()
    code = (
        "import os\n"
        f"open('/tmp/{name}', 'w').write('x')\n"
        f"print('tmp ok', os.path.exists('/tmp/{name}'))\n"
        "for path in ['/etc/nice-sandbox-escape', '/var/tmp/nice-sandbox-escape', '/usr/nice-sandbox-escape']:\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno)\n"
        "print(sorted(os.listdir('/root')) if os.path.isdir('/root') else 'no /root')\n"
    )
    r = run_untrusted(code, isolation="bubblewrap")
    assert r.returncode == 0, r.stderr
    assert "tmp ok True" in r.stdout and "WROTE" not in r.stdout
    assert not os.path.exists(f"/tmp/{name}")
    for path in ["/etc/nice-sandbox-escape", "/var/tmp/nice-sandbox-escape", "/usr/nice-sandbox-escape"]:
        assert not os.path.exists(path)


@needs_bwrap
def test_bubblewrap_has_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        "try:\n"
        f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "    s.sendall(b'leak')\n"
        "    print('CONNECTED')\n"
        "except OSError as e:\n"
        "    print('refused', e)\n"
    )
    r = run_untrusted(code, isolation="bubblewrap")
    # The kernel completes connections into the backlog without accept(): look there afterwards.
    server.settimeout(0.2)
    received = []
    try:
        conn, _ = server.accept()
        conn.settimeout(0.2)
        received.append(conn.recv(100))
        conn.close()
    except OSError:
        pass
    server.close()
    assert "CONNECTED" not in r.stdout and "refused" in r.stdout
    assert received == []


@pytest.mark.parametrize("mode", MODES)
def test_cannot_kill_parent(mode):
    me = os.getpid()
    code = (
        "import os, signal\n"
        f"for target in [lambda: os.kill(os.getppid(), 9), lambda: os.kill({me}, 9),\n"
        f"               lambda: os.killpg(os.getpgid({me}), 9), lambda: os.kill(1, 9)]:\n"
        "    try:\n"
        "        target()\n"
        "        print('SENT')\n"
        "    except OSError as e:\n"
        "        print('refused', e.errno)\n"
        "try:\n"
        "    os.kill(-1, 9)\n"
        "except OSError:\n"
        "    pass\n"
        "os.killpg(0, 9)\n"
    )
    r = run_untrusted(code, timeout_s=TIMEOUT, isolation=mode)
    assert os.getpid() == me  # still here
    if IS_ROOT:
        assert "SENT" not in r.stdout
    assert r.killed  # it killed itself, nothing else
    assert _no_leftovers(r)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(sandbox, "_warned", False)
    monkeypatch.setitem(sandbox._probes, "bubblewrap", (False, "forced off for this test"))
    assert sandbox_kind() == "rlimits-only"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r1 = run_untrusted("print(1)")
        r2 = run_untrusted("print(2)")
    assert r1.stdout == "1\n" and r2.stdout == "2\n" and r1.sandbox == "rlimits-only"
    messages = [str(w.message) for w in caught if "without bubblewrap" in str(w.message)]
    assert len(messages) == 1 and "NO filesystem or network isolation" in messages[0]
    with pytest.raises(RuntimeError, match="forced off"):
        run_untrusted("print(1)", isolation="bubblewrap")


def test_bad_isolation_name():
    with pytest.raises(ValueError):
        run_untrusted("pass", isolation="docker")
