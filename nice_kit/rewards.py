"""Reward metrics: one shape for every metric, a registry, and the built-in metrics.

A metric is a plain callable with the shape TRL's reward functions use::

    metric(prompts: list[str], completions: list[str], **columns) -> list[float]

``columns`` holds the target records' extra columns (``answer``, ``task``, ``tests`` ...), one list
entry per completion. Metrics are registered by name with :func:`register_metric` on a *factory*
(``factory(**params) -> metric``) so that a metric picker can list them, show their description and
parameters, and build one with the user's settings.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


class Metric(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]: ...


@dataclass(frozen=True)
class MetricInfo:
    """A registered metric: how to build it and what to tell the user about it."""

    name: str
    factory: Callable[..., Metric]
    description: str
    needs_reference: bool
    params: dict[str, Any] = field(default_factory=dict)  # parameter name -> default value


_REGISTRY: dict[str, MetricInfo] = {}


def register_metric(name: str, description: str, needs_reference: bool = False):
    """Decorator registering ``factory(**params) -> metric`` under ``name``.

    ``needs_reference`` says whether the metric reads reference answers (or tests) from the target
    records; metrics that do not can drive label-free selection.
    """

    def decorate(factory: Callable[..., Metric]) -> Callable[..., Metric]:
        params = {
            p.name: (None if p.default is inspect.Parameter.empty else p.default)
            for p in inspect.signature(factory).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        _REGISTRY[name] = MetricInfo(name, factory, description, needs_reference, params)
        return factory

    return decorate


def _load_plugins() -> None:
    # Metrics that live in their own modules register themselves on import.
    import importlib

    for module in ("nice_kit.code_metrics", "nice_kit.model_metrics"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # optional module not present in this build
            if err.name != module:
                raise


def metric_info(name: str) -> MetricInfo:
    _load_plugins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown metric {name!r}; registered metrics: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_metric(name: str | Callable[..., list[float]], **params: Any) -> Metric:
    """Build a registered metric by name with ``params``; a callable is returned unchanged."""
    if callable(name):
        return name  # any user function with the metric shape
    info = metric_info(name)
    unknown = set(params) - set(info.params)
    if unknown:
        raise TypeError(f"metric {name!r} takes parameters {sorted(info.params)}, not {sorted(unknown)}")
    return info.factory(**params)


def list_metrics():
    """The registered metrics as a DataFrame (name, description, needs_reference, params)."""
    import pandas as pd

    _load_plugins()
    return pd.DataFrame(
        [
            {"name": i.name, "description": i.description, "needs_reference": i.needs_reference, "params": i.params}
            for i in sorted(_REGISTRY.values(), key=lambda i: i.name)
        ]
    )


def score(metric: Metric, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """Call ``metric`` and check what it returns: one finite float per completion."""
    rewards = list(metric(prompts, completions, **columns))
    if len(rewards) != len(completions):
        raise ValueError(f"metric returned {len(rewards)} rewards for {len(completions)} completions")
    out = []
    for i, r in enumerate(rewards):
        r = float(r)
        if not math.isfinite(r):
            raise ValueError(f"metric returned a non-finite reward {r} for completion {i}")
        out.append(r)
    return out


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


def _column(columns: dict[str, Any], name: str, n: int, metric: str) -> list[Any]:
    if name not in columns or columns[name] is None:
        raise KeyError(f"metric {metric!r} needs the target column {name!r}; the records have {sorted(columns)}")
    values = list(columns[name])
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return values


@register_metric(
    "task_score",
    "The bundled task's own scorer (reasoning-gym score_answer) on the extracted answer. "
    "extract='strict' takes the completion's first line as the answer; 'last_number' is lenient "
    "and takes the last number anywhere in the completion.",
    needs_reference=True,
)
def task_score(extract: str = "strict") -> Metric:
    import reasoning_gym

    if extract not in _EXTRACTORS:
        raise ValueError(f"extract must be one of {sorted(_EXTRACTORS)}, not {extract!r}")
    extractor = _EXTRACTORS[extract]

    def metric(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        n = len(completions)
        tasks = _column(columns, "task", n, "task_score")
        answers = _column(columns, "answer", n, "task_score")
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
)
def exact_match(extract: str = "strict", column: str = "answer") -> Metric:
    if extract not in _EXTRACTORS:
        raise ValueError(f"extract must be one of {sorted(_EXTRACTORS)}, not {extract!r}")
    extractor = _EXTRACTORS[extract]

    def metric(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        refs = _column(columns, column, len(completions), "exact_match")
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


@register_metric(
    "format",
    "1 if the whole completion (stripped) matches the regular expression pattern, else 0; the "
    "default asks for a bare integer. Needs no reference.",
)
def format_match(pattern: str = r"-?\d+") -> Metric:
    compiled = re.compile(pattern)

    def metric(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    return metric
