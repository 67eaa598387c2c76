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
from .data import load_records, save_records
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


def fast_data(folder: Path, n_pool: int = 40, n_val: int = 4, n_test: int = 4) -> dict[str, str]:
    """A slice of the bundled benchmark (both subtasks of the target) written to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.from_file(DEFAULT_CONFIG).data
    paths = {}
    for name, src, n in (("pool", cfg.pool, n_pool), ("target_val", cfg.target_val, n_val),
                         ("target_test", cfg.target_test, n_test)):
        records = load_records(src, require_response=True)
        if name == "pool":
            part = records[:n]
        else:  # n of each subtask
            tasks = sorted({r.columns.get("task") for r in records})
            part = [r for t in tasks for r in [x for x in records if x.columns.get("task") == t][:n]]
        save_records(part, folder / f"{name}.jsonl")
        paths[name] = str(folder / f"{name}.jsonl")
    return paths


def demo_config(run_dir: str | Path, fast: bool | None = None, **overrides: Any) -> RunConfig:
    """The bundled default config, or its fast variant; ``overrides`` are nested dicts of settings."""
    base = RunConfig.from_file(DEFAULT_CONFIG).to_dict()
    if fast_mode(fast):
        base = merge_settings(base, FAST_OVERRIDES)
        base["data"].update(fast_data(Path(run_dir) / "data"))
    return RunConfig.from_dict(merge_settings(base, overrides))


def demo_pipeline(run_dir: str | Path = "runs/demo", fast: bool | None = None, verbose: bool = True,
                  **overrides: Any) -> Pipeline:
    """A :class:`Pipeline` on the bundled data: the default model, or a tiny one in fast mode."""
    cfg = demo_config(run_dir, fast, **overrides)
    if fast_mode(fast):
        import torch

        from .models import load_tokenizer, tiny_model

        torch.set_num_threads(1)
        tok = load_tokenizer(cfg.model)
        return Pipeline(cfg, run_dir, model=tiny_model(tok), tokenizer=tok, verbose=verbose)
    return Pipeline(cfg, run_dir, verbose=verbose)
