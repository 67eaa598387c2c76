"""nice_kit: choose instruction-tuning data by the task's real metric (NICE), with LESS as baseline.

The verbs most people need::

    from nice_kit import Pipeline, RunConfig
    run = Pipeline(RunConfig.from_file("configs/default.toml"), "runs/default")
    run.run()            # warmup -> gradients -> rollouts -> scores.csv -> selected.jsonl
    run.scores()         # DataFrame: id, less, nice

Reward metrics share TRL's shape ``metric(prompts, completions, **columns) -> list[float]``; see
the :mod:`nice_kit.metrics` package. Everything else is one module a concept: data, models, warmup, gradients,
projection, rollouts, policy, influence, evaluation, runs.
"""

import importlib
from typing import Any

# Exported lazily, so that ``import nice_kit.metrics`` (a metric in a worker process, say) stays cheap.
_EXPORTS = {
    "RunConfig": "config", "DataError": "data", "Record": "data", "load_records": "data", "save_records": "data",
    "DEFAULT_MODEL": "models", "load_model": "models", "load_tokenizer": "models", "Pipeline": "pipeline",
    "get_metric": "metrics", "list_metrics": "metrics", "register_metric": "metrics",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'nice_kit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
