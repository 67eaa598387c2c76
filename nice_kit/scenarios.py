"""The second bundled scenario, ``verbose_refs``: verbose references, a strict metric.

``data/verbose_refs`` (written by ``scripts/make_benchmark.py --scenario verbose_refs``) is the first
benchmark's arithmetic with the target's reference answers in a tutor's verbose style ("Let me work this
out step by step.\\n7 times 8 equals 56.\\nSo the answer is 56.") and the metric of
``configs/verbose_refs.toml`` strict on the bare answer (``task_score``, the first line is the answer):
every reference scores 0 under it. It is **designed** to make the reference loss (LESS's proxy) and the
metric (NICE's target) disagree; ``data/arith`` is the case where they mostly agree.

``scenario_pipeline(run_dir)`` is that run, as :func:`nice_kit.demo.demo_pipeline` is the first
benchmark's; in fast mode (``fast=True`` or ``NICE_KIT_FAST=1``) a tiny random model on a slice of the
scenario, with :data:`nice_kit.demo.FAST_OVERRIDES` (so the numbers mean nothing; the code path is real).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import RunConfig
from .demo import ROOT, demo_config, demo_pipeline, fast_data
from .pipeline import Pipeline

SCENARIO = "verbose_refs"
CONFIG = ROOT / "configs" / f"{SCENARIO}.toml"


def scenario_fast_data(folder: Path, n_pool: int = 40, n_val: int = 4, n_test: int = 4) -> dict[str, str]:
    """A slice of the scenario written to ``folder``: the first ``n_pool`` pool examples (shuffled when
    generated: both styles, correct and wrong, on- and off-task), ``n_val`` and ``n_test`` target prompts of
    each subtask."""
    return fast_data(folder, n_pool, n_val, n_test, config=CONFIG)


def scenario_config(run_dir: str | Path, fast: bool | None = None, **overrides: Any) -> RunConfig:
    """``configs/verbose_refs.toml``, or its fast variant; ``overrides`` are nested dicts of settings."""
    return demo_config(run_dir, fast, config=CONFIG, **overrides)


def scenario_pipeline(run_dir: str | Path = f"runs/{SCENARIO}", fast: bool | None = None, verbose: bool = True,
                      **overrides: Any) -> Pipeline:
    """A :class:`Pipeline` on the scenario: the bundled model, or a tiny random one in fast mode."""
    return demo_pipeline(run_dir, fast, verbose, config=CONFIG, **overrides)
