"""Metrics that check an answer or a property of the text: the bundled task's scorer, exact match,
sentiment, length and format. They register themselves in :mod:`nice_kit.metrics.registry` on import."""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from .registry import Metric, register_metric, require_column

# ----------------------------------------------------------------------------------------------
# Answer extraction shared by the answer-checking metrics.

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def strict_answer(completion: str) -> str:
    """The completion as the model's final answer: stripped, up to the first line break."""
    text = completion.strip()
    return text.splitlines()[0].strip() if text else ""


def last_number(completion: str) -> str:
    """The last number in the completion, or an empty string."""
    found = _NUMBER.findall(completion.replace(",", ""))
    return found[-1] if found else ""


_EXTRACTORS = {"strict": strict_answer, "last_number": last_number}


def _check_extract(params: dict[str, Any]) -> list[str]:
    if params.get("extract") not in _EXTRACTORS:
        return [f"extract must be one of {sorted(_EXTRACTORS)}, not {params.get('extract')!r}"]
    return []


def _check_task(params: dict[str, Any], columns: dict[str, Any]) -> list[str]:
    """The record's ``task`` must name a reasoning-gym dataset (its scorer scores the answer)."""
    from reasoning_gym.factory import DATASETS

    task = columns.get("task")
    if task is None or (isinstance(task, str) and task in DATASETS):
        return []
    near = difflib.get_close_matches(str(task), list(DATASETS), n=3)
    hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else f" ({len(DATASETS)} tasks are known)"
    return [f"task {task!r} has no reasoning-gym scorer{hint}"]


@register_metric(
    "task_score",
    "The bundled task's own scorer (reasoning-gym score_answer) on the extracted answer. "
    "extract='strict' takes the completion's first line as the answer; 'last_number' is lenient "
    "and takes the last number anywhere in the completion.",
    needs_reference=True,
    columns=("task", "answer"),
    check_params=_check_extract,
    check_record=_check_task,
)
def task_score(extract: Literal["strict", "last_number"] = "strict") -> Metric:
    import reasoning_gym

    if extract not in _EXTRACTORS:
        raise ValueError(f"extract must be one of {sorted(_EXTRACTORS)}, not {extract!r}")
    extractor = _EXTRACTORS[extract]

    def metric(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        n = len(completions)
        tasks = require_column(columns, "task", n, "task_score")
        answers = require_column(columns, "answer", n, "task_score")
        metadata = columns.get("metadata") or [{} for _ in range(n)]
        out = []
        for completion, task, answer, meta in zip(completions, tasks, answers, metadata):
            scorer = reasoning_gym.get_score_answer_fn(task)
            entry = {"question": "", "answer": str(answer), "metadata": meta or {}}
            out.append(float(scorer(extractor(completion), entry)))
        return out

    return metric


@register_metric(
    "exact_match",
    "1 if the extracted answer equals the reference answer exactly (after stripping), else 0.",
    needs_reference=True,
    columns=lambda params: (params.get("column", "answer"),),
    check_params=_check_extract,
)
def exact_match(extract: Literal["strict", "last_number"] = "strict", column: str = "answer") -> Metric:
    if extract not in _EXTRACTORS:
        raise ValueError(f"extract must be one of {sorted(_EXTRACTORS)}, not {extract!r}")
    extractor = _EXTRACTORS[extract]

    def metric(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        refs = require_column(columns, column, len(completions), "exact_match")
        return [float(extractor(c) == str(r).strip()) for c, r in zip(completions, refs)]

    return metric


@register_metric(
    "sentiment",
    "VADER compound sentiment of the completion, rescaled from [-1, 1] to [0, 1]. Needs no reference.",
)
def sentiment() -> Metric:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def metric(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [(analyzer.polarity_scores(c)["compound"] + 1.0) / 2.0 for c in completions]

    return metric


@register_metric(
    "length",
    "1 when the completion has at most max_words words, falling linearly to 0 at twice that. "
    "Needs no reference.",
    check_params=lambda p: [] if isinstance(p.get("max_words"), int) and p["max_words"] >= 1
    else [f"max_words must be an integer of at least 1, not {p.get('max_words')!r}"],
)
def length(max_words: int = 5) -> Metric:
    if max_words < 1:
        raise ValueError("max_words must be at least 1")

    def metric(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        out = []
        for c in completions:
            words = len(c.split())
            out.append(1.0 if words <= max_words else max(0.0, 1.0 - (words - max_words) / max_words))
        return out

    return metric


def _check_pattern(pattern: Any) -> list[str]:
    if not isinstance(pattern, str):
        return [f"pattern must be a regular expression string, not {pattern!r}"]
    try:
        re.compile(pattern)
    except re.error as err:
        return [f"pattern {pattern!r} is not a valid regular expression: {err}"]
    return []


@register_metric(
    "format",
    "1 if the whole completion (stripped) matches the regular expression pattern, else 0; the "
    "default asks for a bare integer. Needs no reference.",
    check_params=lambda params: _check_pattern(params.get("pattern")),
)
def format_match(pattern: str = r"-?\d+") -> Metric:
    compiled = re.compile(pattern)

    def metric(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return metric
