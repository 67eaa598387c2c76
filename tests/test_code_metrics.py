"""Code-execution metrics: scores for correct and partial code, HumanEval, and hostile completions."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

import pytest

from nice_kit.metrics import sandbox
from nice_kit.metrics.code import extract_code, humaneval_units, load_humaneval_records, run_tests
from nice_kit.metrics import get_metric, list_metrics, metric_info

TASKS = Path(__file__).resolve().parents[1] / "data" / "code" / "tasks.jsonl"
TIMEOUT = 2.0
MARGIN = 2.0  # start-up and clean-up on a busy 2-core machine
IS_ROOT = os.geteuid() == 0
MODES = ["bubblewrap", "rlimits-only"]
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0", "assert add(10, 32) == 42"]


@pytest.fixture(autouse=True)
def _quiet_fallback_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="nice_kit.metrics.sandbox: running untrusted code without bubblewrap")
        yield


@pytest.fixture(autouse=True)
def _bubblewrap_is_installed(request):
    """bubblewrap is part of the dev install (scripts/setup.sh --dev): its tests fail, never skip, without it."""
    if "bubblewrap" in request.node.name or "batch" in request.node.name:
        assert shutil.which("bwrap") and sandbox._probe("bubblewrap")[0], (
            "bubblewrap is part of the dev install: scripts/setup.sh --dev (as root) or apt-get install bubblewrap",
            sandbox._probes.get("bubblewrap"))


@pytest.fixture
def fallback(monkeypatch):
    """Force the rlimits-only sandbox, as on a machine without bubblewrap."""
    monkeypatch.setattr(sandbox, "_warned", False)
    monkeypatch.setitem(sandbox._probes, "bubblewrap", (False, "forced off for this test"))
    assert sandbox.sandbox_kind() == "rlimits-only"


def _score(completion, tests=ADD_TESTS, **params):
    metric = get_metric("code_tests", **params)
    return metric(["Write add(a, b)."], [completion], tests=[tests], entry_point=["add"])[0]


# ----------------------------------------------------------------------------------------------
# Ordinary scoring


def test_registered():
    names = set(list_metrics()["name"])
    assert {"code_tests", "humaneval"} <= names
    info = metric_info("code_tests")
    assert info.needs_reference and info.params["mode"] == "partial"
    assert {"timeout_s", "memory_mb"} <= set(info.params)
    assert metric_info("humaneval").needs_reference


def test_extract_code():
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"
    fenced = "Here you go:\n```python\ndef f():\n    return 1\n```\nIt returns 1."
    assert extract_code(fenced) == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nx = 1\n") == "x = 1\n"  # cut off before the closing fence
    two = "```bash\npip install x\n```\n```python\ny = 2\n```"
    assert extract_code(two) == "y = 2\n"


def test_correct_partial_and_wrong():
    assert _score("def add(a, b):\n    return a + b\n") == 1.0
    # Right only when b == 0 or a == -b: passes 2 of the 4 tests.
    half = "def add(a, b):\n    return a if b == 0 else (0 if a == -b else 7)\n"
    assert _score(half) == 0.5
    assert _score(half, mode="pass_fail") == 0.0
    assert _score("def add(a, b):\n    return a + b\n", mode="pass_fail") == 1.0
    assert _score("def add(a, b) return a + b") == 0.0  # syntax error
    assert _score("def plus(a, b):\n    return a + b\n") == 0.0  # no entry point
    assert _score("```python\ndef add(a, b):\n    return a + b\n```\nThis adds.") == 1.0
    assert _score("def add(a, b):\n    return a + b\n", tests=[]) == 0.0
    with pytest.raises(ValueError):
        get_metric("code_tests", mode="most")


def test_prefix_and_stub_prompts():
    metric = get_metric("code_tests")
    stub = 'def add(a, b):\n    """Return a + b."""\n'
    body = "    return a + b\n"
    # A prompt that is a Python stub is prepended; an instruction is not.
    assert metric([stub], [body], tests=[ADD_TESTS]) == [1.0]
    assert metric(["Write add."], [body], tests=[ADD_TESTS], code_prefix=[stub]) == [1.0]
    assert metric(["Write add."], [body], tests=[ADD_TESTS]) == [0.0]


def test_crash_and_timeout_keep_the_tests_already_reported():
    tests = ["assert add(1, 1) == 2", "assert add(2, 2) == 4", "assert add(-1, 0) == -1", "assert add(3, 3) == 6"]
    loops = "def add(a, b):\n    while a < 0:\n        pass\n    return a + b\n"
    t = time.monotonic()
    outcome = run_tests(loops, tests, timeout_s=TIMEOUT)
    assert outcome.passed == [True, True, False, False] and outcome.result.timed_out
    assert time.monotonic() - t < TIMEOUT + MARGIN
    exits = "import os\ndef add(a, b):\n    if a < 0:\n        os._exit(0)\n    return a + b\n"
    outcome = run_tests(exits, tests)
    assert outcome.passed == [True, True, False, False] and outcome.share == 0.5
    assert any("candidate process ended" in note for note in outcome.notes), outcome.notes


def test_bundled_tasks_reference_solutions_score_one():
    records = [json.loads(line) for line in TASKS.read_text().splitlines() if line.strip()]
    assert 18 <= len(records) <= 30
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert r["task"] == "code" and r["id"].startswith("code-")
        assert 3 <= len(r["tests"]) <= 5 and r["entry_point"] in r["response"]
        assert r["entry_point"] in r["prompt"]
    metric = get_metric("code_tests", mode="pass_fail")
    scores = metric(
        [r["prompt"] for r in records],
        [r["response"] for r in records],
        tests=[r["tests"] for r in records],
        entry_point=[r["entry_point"] for r in records],
    )
    assert scores == [1.0] * len(records)


def test_humaneval_records_and_metric():
    records = load_humaneval_records(4)
    assert len(records) == 4
    r = records[0]
    assert r["id"] == "HumanEval/0" and r["task"] == "humaneval"
    assert set(r) == {"id", "prompt", "response", "task", "test", "entry_point", "code_prefix"}
    assert r["code_prefix"] == r["prompt"]
    columns = {"test": [r["test"] for r in records], "entry_point": [r["entry_point"] for r in records]}
    prompts = [r["prompt"] for r in records]
    for mode in ("pass_fail", "partial"):
        metric = get_metric("humaneval", mode=mode)
        assert metric(prompts, [r["response"] for r in records], **columns) == [1.0] * 4
        assert metric(prompts, ["    return None\n"] * 4, **columns) == [0.0] * 4


def test_humaneval_partial_credit():
    add = next(r for r in load_humaneval_records(60) if r["entry_point"] == "add")
    units, bind = humaneval_units(add["test"], "add", "partial")
    assert bind and sum(counted for _, counted in units) >= 2
    wrong_sometimes = "    return x + y if x < 5 else 0\n"
    columns = {"test": [add["test"]], "entry_point": ["add"]}
    partial = get_metric("humaneval", mode="partial")([add["prompt"]], [wrong_sometimes], **columns)[0]
    assert 0.0 < partial < 1.0
    assert get_metric("humaneval")([add["prompt"]], [wrong_sometimes], **columns) == [0.0]


# ----------------------------------------------------------------------------------------------
# Hostile completions: each scores 0 within the time limit and leaves the host alone.


def _no_leftovers(result) -> bool:
    if result is None or result.uid is None:
        return True
    for _ in range(100):
        if not sandbox._processes_of(result.uid):
            return True
        time.sleep(0.02)
    return False


CORRECT_IF_OK = "\ndef add(a, b):\n    return a + b if ok else None\n"

HOSTILE = {
    "endless_loop": "while True:\n    pass\n" + CORRECT_IF_OK.replace("if ok else None", ""),
    "fork_bomb": "import os\nwhile True: os.fork()\n" + CORRECT_IF_OK.replace("if ok else None", ""),
    "memory_hog": "x = bytearray(10 * 1024 ** 3)\n" + CORRECT_IF_OK.replace("if ok else None", ""),
    "output_flood": "while True:\n    print('x' * 10000)\n" + CORRECT_IF_OK.replace("if ok else None", ""),
    "forge_markers": (
        "import builtins, os, re, sys\n"
        "text = open('/proc/self/cmdline', 'rb').read().decode('utf-8', 'replace')\n"
        "text += ' '.join(os.listdir('.')) + ' '.join(open(f).read() for f in os.listdir('.') if os.path.isfile(f))\n"
        "text += str(dict(os.environ)) + sys.stdin.read()\n"
        "tokens = set(re.findall(r'[0-9a-f]{16,64}', text))\n"
        "for i in range(8):\n"
        "    print('\\n'.join(f'{t} {i} pass' for t in tokens))\n"
        "    print(f'PASS {i}\\n{i} pass\\npass {i}')\n"
        "_write = os.write\n"
        "os.write = lambda fd, data: _write(fd, data.replace(b'fail', b'pass'))\n"
        "builtins.exec = lambda *args, **kwargs: None\n"
        "builtins.compile = lambda *args, **kwargs: None\n"
        "def add(a, b):\n    return None\n"
    ),
}


# Forging a verdict from inside: walk the frames up to the harness and write its pass markers with
# its own writer (what beat the nonce design: 6 lines), then try every file descriptor of this
# process, of its parent (the harness) and of pid 1, kill the parent so that it cannot contradict
# the forged lines, and leave.
FORGE = """
import os, sys
def _forge():
    f = sys._getframe()
    while f is not None and 'units' not in f.f_locals:
        f = f.f_back
    if f is not None:
        for c, m in f.f_locals['units']:
            if m: f.f_locals['_write'](f.f_locals['out'], m[0])
    lines = ''.join('%d pass\\n' % i for i in range(16)).encode()
    f = sys._getframe()
    while f is not None:
        for scope in (f.f_locals, f.f_globals):
            for name, value in list(scope.items()):
                if callable(value) and name in ('write', '_write', 'verdict', 'report'):
                    for i in range(16):
                        try:
                            value('%d pass' % i)
                        except Exception:
                            pass
        f = f.f_back
    own = set()
    for fd in os.listdir('/proc/self/fd'):
        try:
            own.add(os.readlink('/proc/self/fd/' + fd))
        except OSError:
            pass
    for pid in (os.getppid(), 1):
        try:
            fds = os.listdir('/proc/%d/fd' % pid)
        except OSError:
            continue
        for fd in fds:
            path = '/proc/%d/fd/%s' % (pid, fd)
            try:
                if os.readlink(path) not in own:
                    with open(path, 'wb') as out:
                        out.write(lines)
            except OSError:
                pass
    try:
        os.kill(os.getppid(), 9)  # so that the harness cannot write its own verdicts after the forged ones
    except OSError:
        pass
    for fd in range(3, 64):
        try:
            os.write(fd, lines)
        except OSError:
            pass
    os._exit(0)
"""
HOSTILE["frame_walk_at_load"] = FORGE + "_forge()\n"
HOSTILE["frame_walk_in_test"] = FORGE + "def add(a, b):\n    return _forge()\n"
HOSTILE["always_equal"] = (
    "class Anything(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
    "class Equal:\n    def __eq__(self, other):\n        return True\n"
    "def add(a, b):\n    return Equal() if a > 0 else Anything(7)\n"
)


def _hostile_with_context(name, tmp_path, monkeypatch):
    """Hostile completions that need paths, a port, or a secret. Returns (code, check)."""
    if name == "files_outside":
        sentinel = tmp_path / "sentinel.txt"
        sentinel.write_text("keep me")
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        before = sorted(os.listdir(tmp_path)), sorted(os.listdir(cwd))
        code = (
            "import os, shutil\nok = False\n"
            f"for action in [lambda: os.remove({str(sentinel)!r}),\n"
            f"               lambda: open({str(tmp_path / 'next_to_it.txt')!r}, 'w').write('x'),\n"
            f"               lambda: open({str(cwd / 'in_cwd.txt')!r}, 'w').write('x'),\n"
            f"               lambda: shutil.rmtree({str(cwd)!r})]:\n"
            "    try:\n        action()\n        ok = True\n    except OSError:\n        pass\n" + CORRECT_IF_OK
        )

        def check(result):
            assert sentinel.read_text() == "keep me"
            assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(cwd))) == before

        return code, check
    if name == "env_secret":
        secret = "nice-secret-" + os.urandom(8).hex()
        monkeypatch.setenv("NICE_SECRET", secret)
        code = (
            "import glob, os\n"
            "print(dict(os.environ))\n"
            "found = os.environ.get('NICE_SECRET', '')\n"
            "for p in glob.glob('/proc/*/environ'):\n"
            "    try:\n        data = open(p, 'rb').read()\n        print(data)\n"
            "        if b'NICE_SECRET' in data:\n            found = 'yes'\n"
            "    except OSError:\n        pass\n"
            "ok = bool(found)\n" + CORRECT_IF_OK
        )

        def check(result):
            assert secret not in result.stdout and secret not in result.stderr

        return code, check
    if name == "network":
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        code = (
            "import socket\nok = False\n"
            f"try:\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    s.sendall(b'leak')\n    ok = True\nexcept OSError:\n    pass\n" + CORRECT_IF_OK
        )

        def check(result):
            server.settimeout(0.2)
            received = []
            try:
                conn, _ = server.accept()
                conn.settimeout(0.2)
                received.append(conn.recv(100))
            except OSError:
                pass
            server.close()
            assert received == []

        return code, check
    if name == "kill_parent":
        me = os.getpid()
        code = (
            "import os\nok = False\n"
            f"for action in [lambda: os.kill(os.getppid(), 9), lambda: os.kill({me}, 9),\n"
            f"               lambda: os.killpg(os.getpgid({me}), 9)]:\n"
            "    try:\n        action()\n        ok = True\n    except OSError:\n        pass\n"
            "try:\n    os.kill(-1, 9)\nexcept OSError:\n    pass\n"
            "os.killpg(0, 9)\n" + CORRECT_IF_OK
        )

        def check(result):
            assert os.getpid() == me

        return code, check
    return HOSTILE[name], lambda result: None


ALL_HOSTILE = [*HOSTILE, "files_outside", "env_secret", "network", "kill_parent"]


CASES = [(n, mode) for mode in MODES for n in ALL_HOSTILE]


@pytest.mark.parametrize("name, mode", CASES)
def test_hostile_completion_scores_zero(name, mode, tmp_path, monkeypatch):
    if mode == "rlimits-only":
        features = sandbox._fallback_features()
        if name == "network" and not features["seccomp"]:
            pytest.skip("documented: the fallback has no network isolation without seccomp (x86-64 and arm64 only)")
        if name == "files_outside" and not (IS_ROOT or features["landlock"]):
            pytest.skip("documented: the fallback run by a normal user without Landlock can write the user's files")
    code, check = _hostile_with_context(name, tmp_path, monkeypatch)
    cwd_before = sorted(os.listdir(os.getcwd()))
    t = time.monotonic()
    outcome = run_tests(code, ADD_TESTS, entry_point="add", timeout_s=TIMEOUT, isolation=mode)
    elapsed = time.monotonic() - t
    assert outcome.share == 0.0, (outcome.passed, outcome.result)
    assert elapsed < TIMEOUT + MARGIN
    assert outcome.result.duration_s < TIMEOUT + MARGIN
    check(outcome.result)
    assert _no_leftovers(outcome.result)
    if name != "files_outside":
        assert sorted(os.listdir(os.getcwd())) == cwd_before
    if name == "output_flood":
        assert outcome.result.reason == "output limit" and elapsed < TIMEOUT
        assert len(outcome.result.stdout.encode()) <= 128 * 1024
    if name == "endless_loop":
        assert outcome.result.timed_out
    if name == "memory_hog":
        assert "MemoryError" in outcome.result.stderr


def test_hostile_batch_through_the_registered_metric(tmp_path, monkeypatch):
    """All hostile completions in one metric call (two run in parallel): all score 0."""
    names = [n for n in ALL_HOSTILE if n != "kill_parent"]  # kill_parent is covered above
    codes, checks = [], {}
    for name in names:
        (tmp_path / name).mkdir()
        code, checks[name] = _hostile_with_context(name, tmp_path / name, monkeypatch)
        codes.append(code)
    codes.append("def add(a, b):\n    return a + b\n")
    metric = get_metric("code_tests", timeout_s=TIMEOUT)
    t = time.monotonic()
    scores = metric(["Write add(a, b)."] * len(codes), codes, tests=[ADD_TESTS] * len(codes), entry_point=["add"] * len(codes))
    elapsed = time.monotonic() - t
    assert scores == [0.0] * len(names) + [1.0]
    assert elapsed < 3 * (TIMEOUT + MARGIN)  # two timeouts, run side by side, plus quick ones
    for name in ("files_outside", "network"):
        if name in checks:
            checks[name](None)


def test_fallback_metric_loop_memory_output_and_warning(fallback):
    codes = [HOSTILE["endless_loop"], HOSTILE["memory_hog"], HOSTILE["output_flood"], "def add(a, b):\n    return a + b\n"]
    metric = get_metric("code_tests", timeout_s=TIMEOUT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.monotonic()
        scores = metric(["Write add."] * 4, codes, tests=[ADD_TESTS] * 4, entry_point=["add"] * 4)
        elapsed = time.monotonic() - t
    assert scores == [0.0, 0.0, 0.0, 1.0]
    assert elapsed < TIMEOUT + MARGIN + 2
    assert sum("without bubblewrap" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("mode", MODES)
def test_humaneval_frame_walk_scores_zero(mode, monkeypatch):
    """The frame walk as a HumanEval completion (a function body calling it), in both modes."""
    if mode == "rlimits-only":
        monkeypatch.setitem(sandbox._probes, "bubblewrap", (False, "forced off for this test"))
    record = load_humaneval_records(1)[0]
    columns = {"test": [record["test"]], "entry_point": [record["entry_point"]]}
    completion = "    return _forge()\n" + FORGE
    for metric_mode in ("pass_fail", "partial"):
        metric = get_metric("humaneval", mode=metric_mode, timeout_s=TIMEOUT)
        assert metric([record["prompt"]], [completion], **columns) == [0.0]
        assert metric([record["prompt"]], [record["response"]], **columns) == [1.0]


def test_values_cross_as_builtin_literals():
    """What the candidate returns reaches the tests as plain values (or opaque handles), so honest
    programs returning namedtuples, numpy numbers, generators or objects with methods still pass."""
    program = (
        "import collections\n"
        "Pair = collections.namedtuple('Pair', 'a b')\n"
        "def pair(a, b):\n    return Pair(a, b)\n"
        "def squares(n):\n    return (i * i for i in range(n))\n"
        "def raises(x):\n    raise ValueError('no %s' % x)\n"
        "class Stack:\n"
        "    def __init__(self):\n        self.items = []\n"
        "    def push(self, x):\n        self.items.append(x)\n"
        "    def pop(self):\n        return self.items.pop()\n"
        "    def __len__(self):\n        return len(self.items)\n"
        "LIMIT = {'a': (1, 2.5, None), 2: b'x', 'n': float('nan')}\n"
    )
    tests = [
        "assert pair(1, 2) == (1, 2)",
        "assert list(squares(4)) == [0, 1, 4, 9]",
        "s = Stack(); s.push([1, {'k': {2, 3}}]); s.push('x'); assert len(s) == 2 and s.pop() == 'x' and s.pop() == [1, {'k': {2, 3}}]",
        "try:\n    raises(3)\nexcept ValueError as e:\n    assert 'no 3' in str(e)\nelse:\n    assert False",
        "assert LIMIT['a'] == (1, 2.5, None) and LIMIT[2] == b'x' and LIMIT['n'] != LIMIT['n']",
        "assert pair(1, 2) == (2, 1)",  # wrong on purpose
    ]
    outcome = run_tests(program, tests)
    assert outcome.passed == [True] * 5 + [False], (outcome.passed, outcome.notes, outcome.result.stderr[-2000:])


def test_humaneval_reference_solutions_that_need_dicts_helpers_and_floats():
    """Canonical solutions whose tests pass dicts (95, 111), call helpers from the prompt (38, 50)
    or compare floats (32, with poly from the prompt) score 1 in both modes."""
    wanted = {"HumanEval/32", "HumanEval/38", "HumanEval/50", "HumanEval/95", "HumanEval/111"}
    records = [r for r in load_humaneval_records() if r["id"] in wanted]
    assert len(records) == len(wanted)
    columns = {"test": [r["test"] for r in records], "entry_point": [r["entry_point"] for r in records]}
    for mode in ("pass_fail", "partial"):
        scores = get_metric("humaneval", mode=mode)([r["prompt"] for r in records], [r["response"] for r in records], **columns)
        assert scores == [1.0] * len(records), (mode, scores)


# ----------------------------------------------------------------------------------------------
# The harness as a package file (#17)


def test_harness_is_a_package_file_pyflakes_clean_and_standard_library_only():
    import ast
    import io
    import sys

    import pyflakes.api as pyflakes_api
    from pyflakes.reporter import Reporter

    from nice_kit.metrics import code

    assert code._HARNESS_PATH == Path(code.__file__).with_name("_harness.py")
    assert code._HARNESS == code._HARNESS_PATH.read_text(encoding="utf-8")
    out = io.StringIO()
    assert pyflakes_api.check(code._HARNESS, str(code._HARNESS_PATH), Reporter(out, out)) == 0, out.getvalue()
    tree = ast.parse(code._HARNESS)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported and imported <= set(sys.stdlib_module_names), imported


def test_harness_imports_without_running_and_its_value_codec_is_strict():
    """Importing the harness (coverage, an IDE) runs nothing; values cross as builtin literals
    (numpy numbers and builtin subclasses as their base type), anything else as a handle, and the
    decoder refuses what is not a value."""
    import collections
    import importlib

    import numpy as np

    harness = importlib.import_module("nice_kit.metrics._harness")
    assert harness._link is None  # _nice_harness did not run
    kept = []

    def handle(v):
        kept.append(v)
        return {"H": len(kept) - 1, "c": callable(v)}

    value = [None, True, 3, 2.5, "s", b"\x00b", 1 + 2j, (1, [2]), {3}, frozenset({4}), {"k": {5: (6,)}}]
    encoded = harness._encode(value, handle)
    assert json.loads(json.dumps(encoded)) == encoded and not kept
    assert harness._decode(encoded, lambda m: pytest.fail("no handle expected")) == value
    Pair = collections.namedtuple("Pair", "a b")
    assert harness._decode(harness._encode([Pair(1, 2), np.int64(7), np.float32(0.5)], handle), None) == [(1, 2), 7, 0.5]
    assert harness._encode(len, handle) == {"H": 0, "c": True} and kept == [len]
    assert harness._decode({"H": 0}, lambda m: ("handle", m["H"])) == ("handle", 0)
    for bad in ({"X": []}, {"L": 1}, {"D": [[1]]}, {"C": ["a", 1]}, [1], {"B": 3}):
        with pytest.raises(ValueError):
            harness._decode(bad, lambda m: None)
    deep = 0
    for _ in range(harness._MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(ValueError, match="nested too deeply"):
        harness._encode(deep, handle)
