"""Reward metrics: one pluggable layer with TRL's shape.

A metric is any callable ``metric(prompts, completions, **columns) -> list[float]`` where
``columns`` are the target records' extra columns (``answer``, ``task``, ``tests`` ...), one entry
per completion. Named metrics live in a registry so that a picker can list them and a config can
name them.

* :mod:`~nice_kit.metrics.registry`: the shape, :func:`register_metric`, :func:`get_metric`,
  :func:`list_metrics`, :func:`score` (checks what a metric returns);
* :mod:`~nice_kit.metrics.tasks`: answer checks (``task_score``, ``exact_match``) and text
  properties (``sentiment``, ``length``, ``format``);
* :mod:`~nice_kit.metrics.code` and :mod:`~nice_kit.metrics.sandbox`: executed tests
  (``code_tests``, ``humaneval``), untrusted code in a separate, limited process;
* :mod:`~nice_kit.metrics.model_based` and :mod:`~nice_kit.metrics.judge_server`: a reward model,
  an LLM judge, and a small OpenAI-compatible server for local judges.
"""

from .registry import (  # noqa: F401
    Metric,
    MetricInfo,
    get_metric,
    list_metrics,
    metric_info,
    metric_names,
    register_metric,
    require_column,
    score,
)
from .tasks import last_number, strict_answer  # noqa: F401

__all__ = ["Metric", "MetricInfo", "get_metric", "last_number", "list_metrics", "metric_info", "metric_names", "register_metric",
           "require_column", "score", "strict_answer"]
