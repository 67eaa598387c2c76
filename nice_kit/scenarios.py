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
from .data import load_records, save_records
from .demo import FAST_OVERRIDES, ROOT, fast_mode
from .pipeline import Pipeline
from .settings import merge_settings

SCENARIO = "verbose_refs"
CONFIG = ROOT / "configs" / f"{SCENARIO}.toml"


def scenario_fast_data(folder: Path, n_pool: int = 40, n_val: int = 4, n_test: int = 4) -> dict[str, str]:
    """A slice of the scenario written to ``folder``: the first ``n_pool`` pool examples (shuffled when
    generated: both styles, correct and wrong, on- and off-task), ``n_val`` and ``n_test`` target prompts of
    each subtask."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig.from_file(CONFIG, check_model=False).data
    paths = {}
    for name, src, n in (("pool", cfg.pool, n_pool), ("target_val", cfg.target_val, n_val),
                         ("target_test", cfg.target_test, n_test)):
        records = load_records(src, require_response=True)
        if name == "pool":
            part = records[:n]
        else:
            tasks = sorted({r.columns.get("task") for r in records})
            part = [r for t in tasks for r in [x for x in records if x.columns.get("task") == t][:n]]
        save_records(part, folder / f"{name}.jsonl")
        paths[name] = str(folder / f"{name}.jsonl")
    return paths


def scenario_config(run_dir: str | Path, fast: bool | None = None, **overrides: Any) -> RunConfig:
    """``configs/verbose_refs.toml``, or its fast variant; ``overrides`` are nested dicts of settings."""
    base = RunConfig.from_file(CONFIG).to_dict()
    if fast_mode(fast):
        base = merge_settings(base, FAST_OVERRIDES)
        base["data"].update(scenario_fast_data(Path(run_dir) / "data"))
    return RunConfig.from_dict(merge_settings(base, overrides))


def scenario_pipeline(run_dir: str | Path = f"runs/{SCENARIO}", fast: bool | None = None, verbose: bool = True,
                      **overrides: Any) -> Pipeline:
    """A :class:`Pipeline` on the scenario: the bundled model, or a tiny random one in fast mode."""
    cfg = scenario_config(run_dir, fast, **overrides)
    if fast_mode(fast):
        import torch

        from .models import load_tokenizer, tiny_model

        torch.set_num_threads(1)
        tok = load_tokenizer(cfg.model)
        return Pipeline(cfg, run_dir, model=tiny_model(tok), tokenizer=tok, verbose=verbose)
    return Pipeline(cfg, run_dir, verbose=verbose)
