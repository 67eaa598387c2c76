"""Ready-made pipelines on the bundled data, for notebooks, tests and first steps.

``demo_pipeline(run_dir)`` is the bundled default (SmolLM2-135M-Instruct, ``configs/default.toml``).
In *fast mode* (``fast=True`` or the environment variable ``NICE_KIT_FAST=1``) it uses a tiny model
built from a config (random weights, the real tokenizer) and a slice of the data, so a notebook runs
top to bottom in about a minute: the numbers are then meaningless, the code path is the real one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import RunConfig
from .data import write_slice
from .pipeline import Pipeline
from .settings import merge_settings

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.toml"


def fast_mode(fast: bool | None = None) -> bool:
    """``fast`` if given, else whether ``NICE_KIT_FAST`` is set to a true value."""
    if fast is not None:
        return fast
    return os.environ.get("NICE_KIT_FAST", "").lower() in ("1", "true", "yes", "on")


FAST_OVERRIDES: dict[str, Any] = {
    "threads": 1,
    "warmup": {"fraction": 0.5, "epochs": 2, "lr": 1e-2, "batch_size": 4},
    "gradients": {"batch_size": 8, "chunk_size": 16},
    "projection": {"dim": 512},
    "rollouts": {"k": 4, "max_new_tokens": 6, "temperature": 1.5},
    # a random tiny model never gets arithmetic right: score the length of its output instead, so
    # that rewards differ between samples and the policy gradient has a signal to show
    "metric": {"name": "length", "params": {"max_words": 3}},
    "evaluation": {"seeds": [0], "epochs": 1, "max_new_tokens": 6},
}


def fast_data(folder: Path, n_pool: int = 40, n_val: int = 4, n_test: int = 4,
              config: str | Path = DEFAULT_CONFIG) -> dict[str, str]:
    """A slice of ``config``'s data (default: the bundled benchmark, both subtasks of the target)
    written to ``folder`` (:func:`nice_kit.data.write_slice`)."""
    d = RunConfig.from_file(config, check_model=False).data
    return write_slice(folder, {"pool": d.pool, "target_val": d.target_val, "target_test": d.target_test},
                       n_pool, n_val, n_test)


def demo_config(run_dir: str | Path, fast: bool | None = None, *, config: str | Path = DEFAULT_CONFIG,
                **overrides: Any) -> RunConfig:
    """``config`` (default: the bundled default), or its fast variant: a tiny model's settings on a slice
    of its data; ``overrides`` are nested dicts of settings."""
    base = RunConfig.from_file(config).to_dict()
    if fast_mode(fast):
        base = merge_settings(base, FAST_OVERRIDES)
        base["data"].update(fast_data(Path(run_dir) / "data", config=config))
    return RunConfig.from_dict(merge_settings(base, overrides))


def demo_pipeline(run_dir: str | Path = "runs/demo", fast: bool | None = None, verbose: bool = True, *,
                  config: str | Path = DEFAULT_CONFIG, **overrides: Any) -> Pipeline:
    """A :class:`Pipeline` on ``config``'s data (default: the bundled benchmark): its model, or a tiny one
    in fast mode."""
    cfg = demo_config(run_dir, fast, config=config, **overrides)
    if fast_mode(fast):
        import torch

        from .models import load_tokenizer, tiny_model

        torch.set_num_threads(1)
        tok = load_tokenizer(cfg.model)
        return Pipeline(cfg, run_dir, model=tiny_model(tok), tokenizer=tok, verbose=verbose)
    return Pipeline(cfg, run_dir, verbose=verbose)
