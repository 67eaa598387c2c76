"""The run configuration: :class:`RunConfig`, read from a TOML file with sections matching its fields.

The settings themselves, their types, ranges, names and help text, live in :mod:`nice_kit.settings`
(the bottom layer). This module reads them from TOML and adds the checks that need more than the
settings: the registered metric and its parameters, and that the model loads offline.

Everything is checked when a config is read (:meth:`RunConfig.from_file`, :meth:`RunConfig.from_dict`)
or built in Python (:func:`validate_config`), before any model is loaded. Every problem is reported
at once, each naming the file and the setting (``configs/x.toml: [rollouts] stop: expected a list of
strings, got the string 'Answer'``), as a :class:`ConfigError`.

What the metric needs of each target record is checked by :func:`check_targets` once the records
are read (:mod:`nice_kit.metrics.records`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .settings import (  # noqa: F401 - the settings classes are re-exported (public API)
    ConfigError,
    DataSettings,
    EvalSettings,
    GradientSettings,
    LoraSettings,
    MetricSettings,
    PolicySettings,
    ProjectionSettings,
    RolloutSettings,
    RunSettings,
    SelectionSettings,
    WarmupSettings,
    apply_overrides,
    build,
    check_settings,
    dotted_overrides,
    merge_settings,
    value_problem,
)

# re-exported: the public API reads the settings classes and the record checks from here too
__all__ = ["ConfigError", "DataSettings", "EvalSettings", "GradientSettings", "LoraSettings", "MetricSettings",
           "PolicySettings", "ProjectionSettings", "RolloutSettings", "RunConfig", "RunSettings", "SelectionSettings",
           "WarmupSettings", "config_source", "read_run_config", "merge_settings", "validate_config"]  # and lazily: check_targets, metric_columns

def __getattr__(name: str) -> Any:
    if name in ("check_targets", "metric_columns"):  # read lazily: they need the data layer (and torch)
        from .metrics import records

        return getattr(records, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_PATH_SETTINGS = (("", "model"), ("data", "pool"), ("data", "target_val"), ("data", "target_test"))


class RunConfig(RunSettings):
    """A run's settings (:class:`nice_kit.settings.RunSettings`), read from TOML and checked."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config", check_model: bool = True) -> "RunConfig":
        """Build and validate a config from nested dicts (``where`` names it in errors).

        ``check_model=False`` skips checking that the model loads offline (for a config written on
        one machine to run on another)."""
        cfg, problems = build(cls, d, where)
        if problems:
            raise ConfigError(problems)
        cfg._source = where
        validate_config(cfg, where, check_model=check_model)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None, check_model: bool = True,
                  sets: typing.Iterable[tuple[str, Any]] = ()) -> "RunConfig":
        """Read and validate a TOML config; relative data and model paths are resolved against the
        file's folder when they do not exist from the working directory. ``overrides`` (nested
        dicts, a metric's ``params`` replaced whole) apply on top of the file before validation, then
        ``sets``: ``("section.setting", value)`` pairs, as the CLI's ``--set`` gives them (a
        ``metric.params.<name>`` sets one parameter and keeps the others)."""
        path = Path(path)
        try:
            d = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except UnicodeDecodeError as err:
            raise ConfigError([f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})"]) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError([f"{path}: invalid TOML: {err}"]) from None
        if overrides:
            d = merge_settings(d, overrides)
        sets = list(sets)
        if sets:
            over = dotted_overrides(sets)
            metric = over.get("metric")
            if isinstance(metric, dict) and "name" in metric and isinstance(d.get("metric"), dict):
                d = merge_settings(d, {"metric": {"params": {}}})  # another metric: the file's params were its own
            d = apply_overrides(d, over)
        where = str(path) + (f" (with --set {', '.join(k for k, _ in sets)})" if sets else "")
        cfg, problems = build(cls, d, where)
        if problems:
            raise ConfigError(problems)
        base = path.resolve().parent
        for name in ("pool", "target_val", "target_test"):
            value = getattr(cfg.data, name)
            if isinstance(value, str) and value and not Path(value).is_absolute() and not Path(value).exists():
                candidate = base / value
                if candidate.exists():
                    setattr(cfg.data, name, str(candidate))
        model = cfg.model
        if isinstance(model, str) and model.startswith(("./", "../")) and not Path(model).exists() \
                and (base / model).exists():
            cfg.model = str(base / model)
        cfg._source = where
        validate_config(cfg, where, check_model=check_model)
        return cfg


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run directory was made with (its ``config.json``), checked but without the model
    check (a run made elsewhere opens without its model). Data paths that do not exist from here are
    looked for beside the run (``run_dir/data/<name>``, then relative to its parent)."""
    import json

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no config.json)")
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError([f"{config_path}: not a readable run config ({err})"]) from None
    data = dict(cfg.get("data", {})) if isinstance(cfg, dict) else {}
    for key in ("pool", "target_val", "target_test"):
        value = data.get(key)
        if not isinstance(value, str) or not value or Path(value).exists():
            continue
        for candidate in (run_dir / "data" / Path(value).name, run_dir.parent / value):
            if candidate.exists():
                data[key] = str(candidate.resolve())
                break
    return RunConfig.from_dict({**cfg, "data": data} if data else cfg, where=str(config_path), check_model=False)


def config_source(cfg: RunSettings) -> str:
    """The file (or ``where``) a config was read from, for error messages; "config" if built in Python."""
    return getattr(cfg, "_source", "config")


def _as_checked(cfg: RunSettings) -> RunSettings:
    """``cfg`` as the settings check sees it: paths given as ``pathlib.Path`` and a metric given as a
    function (both allowed in Python) stand in as strings."""
    changes: dict[str, Any] = {}
    for section, name in _PATH_SETTINGS:
        owner = getattr(cfg, section) if section else cfg
        if isinstance(getattr(owner, name), os.PathLike):
            if section:
                changes[section] = dataclasses.replace(changes.get(section, owner),
                                                       **{name: os.fspath(getattr(owner, name))})
            else:
                changes[name] = os.fspath(getattr(owner, name))
    if callable(cfg.metric.name):
        changes["metric"] = dataclasses.replace(cfg.metric, name="a Python function")
    return dataclasses.replace(cfg, **changes) if changes else cfg


def validate_config(cfg: RunSettings, where: str | None = None, check_model: bool = True) -> None:
    """Check every setting of ``cfg`` (also one built or edited in Python); raise :class:`ConfigError`
    listing every problem, each naming ``where`` (default: the file ``cfg`` was read from) and the
    setting. Loads no model: with ``check_model`` it only checks that the model loads offline."""
    where = where or config_source(cfg)
    problems, bad = check_settings(_as_checked(cfg))
    problems += _metric_problems(cfg, bad)
    if check_model and "model" not in bad:
        from .models import check_model as model_problem

        try:
            model_problem(os.fspath(cfg.model))
        except FileNotFoundError as err:  # models.ModelNotAvailable
            problems.append(("model", str(err)))
    if problems:
        raise ConfigError([f"{where}: {setting}: {msg}" for setting, msg in problems])


def _metric_problems(cfg: RunSettings, bad: set[str]) -> list[tuple[str, str]]:
    """The metric must be registered, its parameters its own, and label-free runs must not feed it
    reference answers."""
    m = cfg.metric
    if "metric.name" in bad or "metric.params" in bad or callable(m.name):
        return []
    from .metrics import metric_info, metric_names

    try:
        info = metric_info(m.name)
    except KeyError:
        names = metric_names()
        near = difflib.get_close_matches(m.name, names, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        return [("[metric] name", f"unknown metric {m.name!r}; {hint}registered: {', '.join(names)}")]
    known_names = not set(m.params) - set(info.params)
    out = _param_types(info, m.params) if known_names else []
    if not out:  # unknown names first, then the metric's own check (given the right types)
        out = [("[metric] params", msg) for msg in info.param_problems(m.params)]
    if cfg.data.label_free and "data.reference_columns" not in bad:
        reads = sorted(set(info.needed_columns(m.params)) & set(cfg.data.reference_columns))
        if info.needs_reference or reads:
            what = f" (it reads {', '.join(reads)})" if reads else ""
            out.append(("[data] label_free", f"label-free mode withholds reference answers, but the metric {m.name!r} "
                                             f"needs them{what}; choose a metric that needs no reference "
                                             "(nice-kit metrics lists them) or set label_free = false"))
    return out


def _param_types(info, params: dict[str, Any]) -> list[tuple[str, str]]:
    """Each given parameter against the factory's annotation (or its default's type)."""
    try:
        hints = typing.get_type_hints(info.factory)
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved: check by the default's type
        hints = {}
    out = []
    for name, value in params.items():
        hint = hints.get(name)
        if hint is None:
            default = info.params.get(name)
            hint = type(default) if isinstance(default, (bool, int, float, str)) else Any
        msg = value_problem(hint, value)
        if msg:
            out.append((f"[metric] params.{name}", msg))
    return out
