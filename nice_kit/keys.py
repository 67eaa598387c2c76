"""What each stage's stored result depends on: pure functions from the settings (and the digests of
the data they read) to a stage's inputs. A stage records its inputs beside its result
(:mod:`nice_kit.runs`) and is reused only when they are unchanged, so these functions decide reuse:
``tests/test_run_store.py`` holds them to the keys a run made before the settings redesign stored.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any, Callable

from .data import Record
from .rollouts import SAMPLER
from .runs import fingerprint
from .settings import RunSettings

# rollout settings that change how fast sampling runs, never what is sampled
ROLLOUT_SPEED_SETTINGS = ("batch_size", "max_batch_tokens")


def callable_key(fn: Callable) -> str:
    """A stable identity for a user's metric function: its code and what it captured.

    Two closures of one factory with different captured values (or defaults) get different keys.
    A callable may define ``cache_key`` (a string) to name itself."""
    explicit = getattr(fn, "cache_key", None)
    if isinstance(explicit, str):
        return explicit
    parts = [f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"]
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn)
    try:
        parts.append(inspect.getsource(target))
    except (OSError, TypeError):
        parts.append(repr(getattr(fn, "__code__", "")))
    func = getattr(fn, "__func__", fn)
    for cell in getattr(func, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            value = None
        parts.append(callable_key(value) if callable(value) else repr(value))
    parts.append(repr(getattr(func, "__defaults__", None)))
    parts.append(repr(getattr(func, "__kwdefaults__", None)))
    if not inspect.isfunction(fn) and not inspect.ismethod(fn):
        parts.append(repr(sorted((k, repr(v)) for k, v in vars(fn).items())) if hasattr(fn, "__dict__") else "")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def records_digest(records: list[Record], with_response: bool = True) -> str:
    """A digest of records' ids, messages and (``with_response``) responses."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.id, r.messages, r.response if with_response else None], sort_keys=True).encode())
    return h.hexdigest()[:16]


def warmup_inputs(cfg: RunSettings, pool_digest: str) -> dict[str, Any]:
    """What the warmup depends on: the pool, the model, LoRA and warmup settings and the seed.
    Not the target task: a new target reuses the warmup and the training gradients."""
    return {"model": cfg.model, "data.pool": pool_digest, "data.columns": cfg.data.columns,
            "data.max_length": cfg.data.max_length, "lora": cfg.lora.__dict__, "warmup": cfg.warmup.__dict__,
            "seed": cfg.seed}


def train_inputs(warmup: dict[str, Any], epoch: int, projection: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's training gradients depend on: the warmup's inputs, the epoch, the projection."""
    return {**warmup, "epoch": epoch, "projection": projection}


def rollout_inputs(cfg: RunSettings, warmup: dict[str, Any], epoch: int, target_prompts: str) -> dict[str, Any]:
    """What the sampled completions depend on (not the metric: rewards are kept beside them);
    ``target_prompts`` is the digest of the target prompts without their responses."""
    settings = {k: v for k, v in cfg.rollouts.__dict__.items() if k not in ROLLOUT_SPEED_SETTINGS}
    return {**warmup, "epoch": epoch, "rollouts": settings, "sampler": SAMPLER, "data.target_val prompts": target_prompts}


def metric_key(cfg: RunSettings) -> dict[str, Any]:
    """What identifies the metric's rewards: its name and parameters, or a user function's code and
    captured values."""
    name = cfg.metric.name
    if callable(name):
        name = "callable:" + callable_key(name)
    return {"name": name, "params": cfg.metric.params}


def reward_inputs(cfg: RunSettings, columns: dict[str, list[Any]], passed: list[str]) -> dict[str, Any]:
    """What the rewards of given completions depend on: the metric and the columns it receives."""
    digest = hashlib.sha256(json.dumps({k: columns[k] for k in passed}, sort_keys=True, default=str).encode())
    return {"metric": metric_key(cfg), "columns": passed, "columns digest": digest.hexdigest()[:16]}


def val_inputs(cfg: RunSettings, train: dict[str, Any], target_digest: str, measurement: str,
               measurement_key: dict[str, Any]) -> dict[str, Any]:
    """What a measurement's validation gradients at a checkpoint depend on."""
    return {**train, "data.target_val": target_digest, "data.label_free": cfg.data.label_free,
            "measurement": measurement, **measurement_key}


def scores_inputs(cfg: RunSettings, train: list[dict[str, Any]], subtasks: list[str],
                  val: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """What the scores depend on: every checkpoint's training and validation inputs (by fingerprint),
    the aggregate and the target prompts' subtasks."""
    out: dict[str, Any] = {"train": [fingerprint(t) for t in train], "selection.aggregate": cfg.selection.aggregate,
                           "data.subtask_column": cfg.data.subtask_column,
                           "subtasks": hashlib.sha256("\n".join(subtasks).encode()).hexdigest()[:16]}
    for name, inputs in val.items():
        out[name] = [fingerprint(i) for i in inputs]
    return out
