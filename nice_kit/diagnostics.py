"""Benchmark diagnostics: what a selection holds, by flags that no selector ever reads.

The bundled arithmetic benchmark (``data/arith``) marks each pool example with ``harmful``,
``on_task`` and ``harm_kind`` (``wrong_answer``, ``verbose``, ``bad_format``). These flags exist to
check a selector's choices without retraining; they are specific to that benchmark, so they live
here and not in the pipeline. For a pool without them, :func:`selection_summary` reports only the
size of each selection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .influence import random_subset

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import Pipeline

FLAG_COLUMNS = ("harmful", "on_task", "harm_kind")
HARM_KINDS = ("wrong_answer", "verbose", "bad_format")


def has_flags(run: "Pipeline") -> bool:
    """Whether the pool carries the benchmark's flag columns."""
    return all(any(c in r.columns for r in run.pool) for c in ("harmful", "on_task"))


def selection_diagnostics(run: "Pipeline", chosen: dict[str, list[str]], write: bool = True) -> pd.DataFrame:
    """Share of harmful, on-task and each kind of harmful example in each method's selection, beside
    the whole pool and the random baseline's subset for seed 0 (the one ``evaluation.compare``
    trains on). Written to ``diagnostics.csv`` (unless ``write`` is False)."""
    flags = pd.DataFrame([{"id": r.id, **{k: r.columns.get(k) for k in FLAG_COLUMNS}}
                          for r in run.pool]).set_index("id")
    fraction = len(next(iter(chosen.values()))) / len(flags)
    rows = [("random", random_subset(list(flags.index), fraction, seed=0)), ("pool", list(flags.index))]
    rows += list(chosen.items())
    out = []
    for name, ids in rows:
        sub = flags.loc[ids]
        row = {"method": name, "k": len(ids)}
        for col in ("harmful", "on_task"):
            if sub[col].notna().all():
                row[f"{col}_share"] = float(sub[col].astype(bool).mean())
        for kind in HARM_KINDS:
            row[f"{kind}_share"] = float((sub["harm_kind"] == kind).mean())
        out.append(row)
    df = pd.DataFrame(out)
    if write:
        df.to_csv(run.run_dir / "diagnostics.csv", index=False)
    return df


def selection_summary(run: "Pipeline", chosen: dict[str, list[str]]) -> pd.DataFrame:
    """The benchmark diagnostics when the pool has its flags; else each method's selection size."""
    if has_flags(run):
        return selection_diagnostics(run, chosen)
    return pd.DataFrame([{"method": m, "k": len(ids)} for m, ids in chosen.items()])
