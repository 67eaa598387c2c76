"""What a run's metric reads of the target records: the columns it receives (:func:`metric_columns`)
and the check of every target record before any stage runs (:func:`check_targets`)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from ..data import DataError, Record
from ..settings import ConfigError, DataSettings, RunSettings
from .registry import metric_info


def load_targets(path: str, cfg: RunSettings) -> list[Record]:
    """The target records at ``path`` for a run with ``cfg``, checked against what its metric reads
    (:func:`check_targets`); label-free: every response is dropped, so none is read anywhere."""
    from ..data import load_records

    records = load_records(path, require_response=not cfg.data.label_free, columns=cfg.data.columns)
    if cfg.data.label_free:
        for r in records:
            r.response = None
    check_targets(records, cfg, path)
    return records


def build_metric(cfg: RunSettings):
    """The configured metric, built: a registered name with its parameters, or the user's callable."""
    from .registry import get_metric

    m = cfg.metric
    if cfg.data.label_free and isinstance(m.name, str) and metric_info(m.name).needs_reference:
        raise ValueError(f"label-free mode needs a metric that reads no reference; {m.name!r} does")
    return get_metric(m.name, **m.params)


def _source(cfg: RunSettings) -> str:
    return getattr(cfg, "_source", "config")


def metric_columns(records: list[Record], cfg: RunSettings) -> tuple[dict[str, list[Any]], list[str], list[str]]:
    """The ``**columns`` a metric receives for ``records`` (one list entry per record), the names
    passed, and the names withheld. In label-free mode the ``data.reference_columns`` are withheld
    and no ``response`` is passed; otherwise every column is passed, with ``response`` (the reference
    response)."""
    names = sorted({k for r in records for k in r.columns})
    withheld = [n for n in names if n in set(cfg.data.reference_columns)] if cfg.data.label_free else []
    cols = {n: [r.columns.get(n) for r in records] for n in names if n not in withheld}
    if not cfg.data.label_free:
        cols["response"] = [r.response for r in records]
    return cols, sorted(cols), withheld


def check_targets(records: list[Record], cfg: RunSettings, path: str | Path | None = None,
                  where: str | None = None) -> None:
    """Check what the run needs of each target record before any stage runs: every column the
    metric reads (registered metrics), the metric's own record check (``task_score``: a task with a
    scorer), and ``data.subtask_column``. Raises :class:`DataError` naming file:line (or row) and the
    column, or :class:`ConfigError` when ``subtask_column`` is on no record at all (a typo).
    ``where`` names the config in that error (default: the file it was read from)."""
    path = str(path) if path is not None else "target records"
    problems: list[str] = []

    def at(i: int, rec: Record) -> str:
        return f"{rec.origin or f'{path}: record {i}'} (id {rec.id})"

    m = cfg.metric
    if isinstance(m.name, str):
        info = metric_info(m.name)
        needed = info.needed_columns(m.params)
        cols, passed, withheld = metric_columns(records, cfg)
        for i, rec in enumerate(records):
            row = {n: cols[n][i] for n in passed}
            missing = [c for c in needed if row.get(c) is None]
            if missing:
                have = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
                problems.append(f"{at(i, rec)}: no column {', '.join(map(repr, missing))}, which the metric "
                                f"{m.name!r} reads (the record has: {have})")
                continue
            problems += [f"{at(i, rec)}: {msg}" for msg in info.record_problems(m.params, row)]
    col = cfg.data.subtask_column
    if col:
        has = [col in r.columns and r.columns[col] is not None for r in records]
        if not any(has) and col != DataSettings.subtask_column:
            names = sorted({k for r in records for k in r.columns})
            near = difflib.get_close_matches(col, names, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError([f"{where or _source(cfg)}: [data] subtask_column: no record of {path} has the column "
                               f"{col!r}; {hint}the records have {', '.join(names) or 'no extra columns'} "
                               '(subtask_column = "" treats all prompts as one task)'])
        if any(has):
            problems += [f"{at(i, r)}: no {col!r} column (data.subtask_column), which the other records have"
                         for i, (r, ok) in enumerate(zip(records, has)) if not ok]
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{len(problems)} problems in the target records:\n  " + "\n  ".join(problems[:10]) + more)
