"""The shape of a metric and the registry of named metrics.

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
    columns: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]] = ()
    # optional checks run when a config is read / before any stage: each returns a list of problems
    check_params: Callable[[dict[str, Any]], list[str]] | None = None
    check_record: Callable[[dict[str, Any], dict[str, Any]], list[str]] | None = None

    def needed_columns(self, params: dict[str, Any] | None = None) -> tuple[str, ...]:
        """The target-record columns this metric reads, given its parameters."""
        cols = self.columns(dict(params or {})) if callable(self.columns) else self.columns
        return tuple(cols)

    def with_defaults(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """``params`` on top of the factory's defaults (what the factory will be called with)."""
        return {**self.params, **(params or {})}

    def param_problems(self, params: dict[str, Any] | None = None) -> list[str]:
        """What is wrong with ``params`` (unknown names, then the metric's own check), without building it."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            takes = ", ".join(f"{k} (default {v!r})" for k, v in self.params.items()) or "no parameters"
            return [f"metric {self.name!r} has no parameter {', '.join(map(repr, unknown))}; it takes {takes}"]
        if self.check_params is None:
            return []
        return list(self.check_params(self.with_defaults(params)))

    def record_problems(self, params: dict[str, Any] | None, columns: dict[str, Any]) -> list[str]:
        """What is wrong with one target record's ``columns`` for this metric (beyond missing columns)."""
        if self.check_record is None:
            return []
        return list(self.check_record(self.with_defaults(params), columns))


_REGISTRY: dict[str, MetricInfo] = {}


def register_metric(name: str, description: str, needs_reference: bool = False,
                    columns: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]] = (),
                    check_params: Callable[[dict[str, Any]], list[str]] | None = None,
                    check_record: Callable[[dict[str, Any], dict[str, Any]], list[str]] | None = None):
    """Decorator registering ``factory(**params) -> metric`` under ``name``.

    ``needs_reference`` says whether the metric reads reference answers (or tests) from the target
    records; metrics that do not can drive label-free selection. ``columns`` names the target
    columns every record must have (or a function of the parameters giving them): the run checks
    them before any stage starts. ``check_params(params)`` and ``check_record(params, columns)``
    (params with the defaults filled in, ``columns`` one target record's) return lists of problems;
    they run when the config is read and before any stage, so that a mistake is not found after the
    rollouts. Both must be cheap: no model loads.
    """

    def decorate(factory: Callable[..., Metric]) -> Callable[..., Metric]:
        params = {
            p.name: (None if p.default is inspect.Parameter.empty else p.default)
            for p in inspect.signature(factory).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        _REGISTRY[name] = MetricInfo(name, factory, description, needs_reference, params, columns,
                                     check_params=check_params, check_record=check_record)
        return factory

    return decorate


def _load_plugins() -> None:
    # Metrics that live in their own modules register themselves on import.
    import importlib

    for module in ("nice_kit.metrics.tasks", "nice_kit.metrics.code", "nice_kit.metrics.model_based"):
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


def metric_names() -> list[str]:
    """The registered metrics' names, sorted."""
    _load_plugins()
    return sorted(_REGISTRY)


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


def require_column(columns: dict[str, Any], name: str, n: int, metric: str) -> list[Any]:
    if name not in columns or columns[name] is None:
        raise KeyError(f"metric {metric!r} needs the target column {name!r}; the records have {sorted(columns)}")
    values = list(columns[name])
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return values
