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
    from .view import RunView

FLAG_COLUMNS = ("harmful", "on_task", "harm_kind")
HARM_KINDS = ("wrong_answer", "verbose", "bad_format")


def has_flags(run: "RunView") -> bool:
    """Whether the pool carries the benchmark's flag columns."""
    return all(any(c in r.columns for r in run.pool) for c in ("harmful", "on_task"))


def selection_diagnostics(run: "RunView", chosen: dict[str, list[str]], write: bool = True) -> pd.DataFrame:
    """Share of harmful, on-task and each kind of harmful example in each method's selection, beside
    the whole pool and the random baseline's subset drawn with the run's seed (``seed`` column: the
    subset ``evaluation.compare`` trains for this run's selection seed), and how concentrated each
    selection's responses are (``top_response_share``: the share of its most common response,
    ``distinct_responses``). Written to ``diagnostics.csv`` (unless ``write`` is False)."""
    flags = pd.DataFrame([{"id": r.id, **{k: r.columns.get(k) for k in FLAG_COLUMNS}}
                          for r in run.pool]).set_index("id")
    responses = {r.id: (r.response or "").strip() for r in run.pool}
    fraction = len(next(iter(chosen.values()))) / len(flags)
    rows = [("random", random_subset(list(flags.index), fraction, seed=run.cfg.seed)), ("pool", list(flags.index))]
    rows += list(chosen.items())
    out = []
    for name, ids in rows:
        sub = flags.loc[ids]
        row = {"method": name, "k": len(ids), "seed": run.cfg.seed if name == "random" else None}
        for col in ("harmful", "on_task"):
            if sub[col].notna().all():
                row[f"{col}_share"] = float(sub[col].astype(bool).mean())
        for kind in HARM_KINDS:
            row[f"{kind}_share"] = float((sub["harm_kind"] == kind).mean())
        counts = pd.Series([responses[i] for i in ids]).value_counts()
        row["top_response_share"] = float(counts.iloc[0] / len(ids))
        row["distinct_responses"] = int(len(counts))
        out.append(row)
    df = pd.DataFrame(out)
    df["seed"] = df["seed"].astype("Int64")  # the random row's seed; empty for the others
    if write:
        df.to_csv(run.run_dir / "diagnostics.csv", index=False)
    return df


def selection_summary(run: "RunView", chosen: dict[str, list[str]]) -> pd.DataFrame:
    """The benchmark diagnostics when the pool has its flags; else each method's selection size."""
    if has_flags(run):
        return selection_diagnostics(run, chosen)
    return pd.DataFrame([{"method": m, "k": len(ids)} for m, ids in chosen.items()])


def reward_signal(run: "RunView") -> pd.DataFrame:
    """Where NICE's policy gradient has a signal: per warmup epoch (and subtask, when the target has
    one), how many target prompts got mixed rewards over their sampled completions (with a baseline,
    the others contribute a zero gradient), and the mean reward."""
    df = run.rollouts()
    col = run.cfg.data.subtask_column
    sub = {str(r.id): str(r.columns.get(col, "all")) for r in run.target_val}
    df = df.assign(subtask=df["prompt_id"].astype(str).map(sub).fillna("all"))
    per_prompt = df.groupby(["epoch", "subtask", "prompt_id"])["reward"].agg(["min", "max", "mean"]).reset_index()
    per_prompt["mixed"] = per_prompt["max"] > per_prompt["min"]
    def row(epoch, subtask, g):
        return {"epoch": epoch, "subtask": subtask, "prompts": len(g), "mixed": int(g["mixed"].sum()),
                "all_zero": int((g["max"] == 0).sum()), "mean_reward": float(g["mean"].mean())}

    out = []
    for epoch, g in per_prompt.groupby("epoch"):
        out.append(row(epoch, "all", g))
        if g["subtask"].nunique() > 1:
            out += [row(epoch, s, gs) for s, gs in g.groupby("subtask")]
    res = pd.DataFrame(out)
    return res.sort_values(["epoch", "subtask"]).reset_index(drop=True)


def response_values(run: "RunView", ids: list[str], top: int = 5) -> pd.DataFrame:
    """The most common responses in a selection (stripped), with their count and share, and how many of
    each are flagged harmful when the pool has flags: what the selected examples have in common."""
    by_id = {r.id: r for r in run.pool}
    df = pd.DataFrame([{"response": (by_id[i].response or "").strip(),
                        "harmful": bool(by_id[i].columns.get("harmful", False))} for i in ids])
    out = df.groupby("response").agg(count=("harmful", "size"), harmful=("harmful", "sum")).reset_index()
    out["share"] = out["count"] / len(df)
    return out.sort_values(["count", "response"], ascending=[False, True]).head(top).reset_index(drop=True)
