"""Deprecated: the metrics moved to :mod:`nice_kit.metrics`. This module keeps
``from nice_kit.rewards import ...`` working for one release."""

import warnings

from .metrics import (  # noqa: F401
    Metric,
    MetricInfo,
    get_metric,
    last_number,
    list_metrics,
    metric_info,
    register_metric,
    require_column,
    score,
    strict_answer,
)

__all__ = ["Metric", "MetricInfo", "get_metric", "last_number", "list_metrics", "metric_info", "register_metric",
           "require_column", "score", "strict_answer"]

warnings.warn("nice_kit.rewards moved to nice_kit.metrics; import from there", DeprecationWarning, stacklevel=2)
