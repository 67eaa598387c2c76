"""Take a selection out: the run's selection, a what-if's or any list of pool ids, as chat records.

One call each::

    from nice_kit.export import selection_records, to_dataset, to_jsonl

    records = selection_records(run)                      # the run's NICE selection (selected.jsonl's rows)
    records = selection_records(run, "less")              # LESS's
    records = selection_records(run, run.what_if(baseline="none"))   # a what-if's top fraction
    records = selection_records(run, explorer.table)      # a DataFrame with an ``id`` column (a filtered view)
    to_jsonl(records, "picked.jsonl")                     # what nice_kit reads back (``data.pool``)
    dataset = to_dataset(records)                         # a datasets.Dataset for TRL's SFTTrainer

Each record is the pool example as the run read it: ``id``, ``messages`` (the prompt's chat turns
and the response as the last ``assistant`` turn: the chat format TRL's ``SFTTrainer`` takes) and the
pool's other columns. The JSONL rows are exactly those of the run's ``selected*.jsonl``.
``to_dataset`` needs the optional ``datasets`` package (``pip install 'nice_kit[export]'``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence, Union

import pandas as pd

from .influence import top_fraction

if TYPE_CHECKING:  # pragma: no cover
    from .view import RunView

Selection = Union[str, Sequence[str], pd.DataFrame, Any]  # a method name, ids, a table with ids, a WhatIf
INSTALL = "pip install 'nice_kit[export]'  (or: pip install datasets)"


def selection_ids(run: "RunView", selection: Selection = "nice") -> list[str]:
    """The pool ids of ``selection``, in its order: a method name ("nice", "less": the run's top
    ``selection.fraction`` by the stored, checked scores, as ``run.select()`` picks them), a what-if
    (:class:`nice_kit.whatif.WhatIf`: its ``selected``), a DataFrame with an ``id`` column (its rows'
    order), or a sequence of ids."""
    if isinstance(selection, str):
        scores = run.read_scores()
        if selection not in scores.columns or selection == "id":
            methods = [c for c in scores.columns if c != "id"]
            raise ValueError(f"{run.run_dir / 'scores.csv'}: no scores of method {selection!r}; it has {methods}")
        return top_fraction(scores["id"].tolist(), scores[selection].to_numpy(), run.cfg.selection.fraction)
    if hasattr(selection, "selected") and hasattr(selection, "scores"):  # a WhatIf
        return [str(i) for i in selection.selected]
    if isinstance(selection, pd.DataFrame):
        if "id" not in selection.columns:
            raise ValueError(f"a table to export needs an 'id' column of pool ids; it has {list(selection.columns)}")
        return selection["id"].astype(str).tolist()
    if isinstance(selection, Iterable):
        ids = [str(i) for i in selection]
        return ids
    raise TypeError("selection: expected a method name, a WhatIf, a DataFrame with an 'id' column or a list of ids, "
                    f"not {type(selection).__name__}")


def selection_records(run: "RunView", selection: Selection = "nice") -> list[dict[str, Any]]:
    """The pool records of ``selection`` (see :func:`selection_ids`), in its order, as JSON-ready dicts:
    ``id``, ``messages`` (chat turns ending with the response as an ``assistant`` turn) and the pool's
    other columns. Ids that are not in the pool raise a KeyError naming them and the pool file."""
    ids = selection_ids(run, selection)
    by_id = {r.id: r for r in run.pool}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise KeyError(f"{run.cfg.data.pool}: no pool example with id {', '.join(map(repr, missing[:5]))}"
                       f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(ids)} ids unknown)")
    return [by_id[i].to_json() for i in ids]


def to_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write ``records`` one JSON object a line (UTF-8, written atomically), as the run writes its
    ``selected.jsonl``: nice_kit reads the file back as a pool, TRL and ``datasets`` as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
    return path


def _flat(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def dataset_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` as rows an Arrow table holds: ``messages`` kept as a list of {role, content};
    every other column whose values are not all plain scalars (nested metadata whose fields differ
    from row to row) is stored as its JSON text."""
    rows = [dict(r) for r in records]
    names = list(dict.fromkeys(k for r in rows for k in r))
    for name in names:
        if name == "messages":
            continue
        if not all(_flat(r.get(name)) for r in rows):
            for r in rows:
                if name in r:
                    r[name] = json.dumps(r[name], ensure_ascii=False, default=str, sort_keys=True)
    for r in rows:
        r["messages"] = [{"role": str(m["role"]), "content": str(m["content"])} for m in r["messages"]]
    return rows


def to_dataset(records: Iterable[dict[str, Any]]):
    """``records`` as a ``datasets.Dataset`` with a ``messages`` column in chat format (what TRL's
    ``SFTTrainer`` trains on) and the other columns (see :func:`dataset_rows`). Needs the optional
    ``datasets`` package: an ImportError says how to install it."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"to_dataset needs the `datasets` package, which is not installed: {INSTALL}") from err
    return datasets.Dataset.from_list(dataset_rows(records))


__all__ = ["selection_ids", "selection_records", "to_jsonl", "to_dataset", "dataset_rows", "INSTALL"]
