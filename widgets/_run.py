"""Opening runs and turning a pipeline's outputs into the tables the widgets show.

Every widget takes either a live :class:`nice_kit.pipeline.Pipeline` or the path of a finished run
directory; :func:`as_pipeline` turns either into a pipeline. Reading a finished run never recomputes:
the stages are cached on disk and the model is only loaded when something must be computed.

All reading of a run (files, caches, settings) goes through this module: the widgets call the
functions here and never a pipeline's stages directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from nice_kit.influence import top_fraction
from nice_kit.pipeline import Pipeline

RunLike = Union[Pipeline, str, Path]

# Pool columns shown beside the scores, in this order, when the records have them.
FLAG_COLUMNS = ("task", "source", "on_task", "harmful", "harm_kind")


def open_run(run_dir: str | Path, verbose: bool = False) -> Pipeline:
    """The :class:`Pipeline` of a run directory for viewing (:meth:`Pipeline.open`: writes nothing)."""
    return Pipeline.open(run_dir, verbose=verbose)


def as_pipeline(run: RunLike) -> Pipeline:
    """A live pipeline as it is, or the pipeline of a run directory."""
    if isinstance(run, Pipeline):
        return run
    if isinstance(run, (str, Path)):
        return open_run(run)
    raise TypeError(f"expected a nice_kit Pipeline or a run directory path, not {type(run).__name__}")


def load_scores(p: Pipeline) -> pd.DataFrame:
    """Influence scores (id + one column per method): ``scores.csv`` when the run wrote it (checked
    against the run's current config: stale scores raise :class:`nice_kit.runs.StaleResultError`
    naming what changed), else computed from the cached vectors."""
    from nice_kit.runs import StaleResultError

    if (p.run_dir / "scores.csv").exists():
        return p.read_scores()
    try:
        return p.scores()
    except StaleResultError:
        raise
    except RuntimeError as err:
        raise RuntimeError(f"{p.run_dir}: no influence scores yet; run the pipeline first ({err})") from err


def score_columns(df: pd.DataFrame) -> list[str]:
    """The method columns of a scores table, NICE first."""
    cols = [c for c in df.columns if c not in ("id",) and c not in FLAG_COLUMNS
            and c not in ("prompt", "response") and pd.api.types.is_numeric_dtype(df[c])
            and not c.endswith("_rank")]
    return sorted(cols, key=lambda c: (c != "nice", c != "less", c))


def pool_frame(p: Pipeline, scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per pool example: id, flag columns present in the data, prompt, response, the method
    scores and each method's rank (1 = most influential)."""
    scores = load_scores(p) if scores is None else scores
    rows = []
    present = [c for c in FLAG_COLUMNS if any(c in r.columns for r in p.pool)]
    for r in p.pool:
        row = {"id": r.id}
        for c in present:
            row[c] = r.columns.get(c)
        row["prompt"] = r.prompt
        row["response"] = r.response or ""
        rows.append(row)
    df = pd.DataFrame(rows)
    df = df.merge(scores, on="id", how="left")
    for m in score_columns(scores):
        df[f"{m}_rank"] = df[m].rank(ascending=False, method="first").astype("Int64")
    return df


def record_text(p: Pipeline, rid: str) -> tuple[list[dict[str, str]], str]:
    """The prompt messages and the response of pool example ``rid``."""
    r = pool_record(p, rid)
    return r.messages, r.response or ""


def spearman(x, y) -> float:
    """Spearman rank correlation (ties get average ranks); NaN pairs are dropped."""
    a = pd.Series(np.asarray(x, dtype=float))
    b = pd.Series(np.asarray(y, dtype=float))
    ok = a.notna() & b.notna()
    if ok.sum() < 2:
        return float("nan")
    ra, rb = a[ok].rank(), b[ok].rank()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def target_columns(p: Pipeline, records) -> dict[str, list[Any]]:
    """The extra columns metrics read, one list entry per record, exactly as the pipeline passes them
    (label-free runs withhold the reference columns)."""
    return p.metric_columns(records)[0]


def rescore(p: Pipeline, rollouts: pd.DataFrame, metric) -> list[float]:
    """Rewards of ``rollouts`` (prompt_id, completion) under ``metric``, with the target columns."""
    from nice_kit import metrics as rewards

    by_id = {r.id: r for r in p.target_val}
    recs = [by_id[str(i)] for i in rollouts["prompt_id"]]
    return rewards.score(metric, [r.prompt for r in recs], rollouts["completion"].tolist(), **target_columns(p, recs))


# ------------------------------------------------------------------------------- selection
def selection_fraction(p: Pipeline) -> float:
    """The share of the pool a method selects (``selection.fraction`` of the run's config)."""
    return float(p.cfg.selection.fraction)


def selected_ids(frame: pd.DataFrame, method: str, fraction: float) -> list[str]:
    """The ids a method selects: the top ``fraction`` of the pool by its score, by the rule the run
    itself uses (:func:`nice_kit.influence.top_fraction`; examples without a score are never picked)."""
    df = frame[frame[method].notna()]
    if df.empty:
        return []
    return top_fraction(df["id"].astype(str).tolist(), df[method].to_numpy(dtype=float), fraction)


def cutoff(frame: pd.DataFrame, method: str, fraction: float) -> float:
    """The lowest score among a method's selected examples (the cutoff line of the plots)."""
    ids = set(selected_ids(frame, method, fraction))
    if not ids:
        return float("nan")
    return float(frame.loc[frame["id"].isin(ids), method].min())


def add_selection(frame: pd.DataFrame, methods: list[str], fraction: float) -> pd.DataFrame:
    """``frame`` with a bool column ``selected_<method>`` per method and ``selected_by`` ("NICE",
    "LESS", "NICE+LESS" or "")."""
    df = frame.copy()
    for m in methods:
        df[f"selected_{m}"] = df["id"].isin(set(selected_ids(df, m, fraction)))
    df["selected_by"] = ["+".join(m.upper() for m in methods if r[f"selected_{m}"]) for _, r in df.iterrows()]
    return df


# --------------------------------------------------------------------------- target side
def checkpoints(p: Pipeline) -> list:
    """The run's warmup checkpoints (epoch, lr, ...), oldest first."""
    return list(p.checkpoints)


def target_records(p: Pipeline) -> list:
    """The validation target records (the prompts the rollouts were sampled for)."""
    return list(p.target_val)


def pool_record(p: Pipeline, rid: str):
    """Pool example ``rid`` (a :class:`nice_kit.data.Record`)."""
    for r in p.pool:
        if r.id == rid:
            return r
    raise KeyError(rid)


def rollouts(p: Pipeline, ckpt) -> pd.DataFrame:
    """A checkpoint's sampled completions with the run's rewards (prompt_id as str)."""
    df = p.rollouts(ckpt)
    return df.assign(prompt_id=df["prompt_id"].astype(str))


def rollout_weights(p: Pipeline, ckpt) -> tuple[pd.DataFrame, dict]:
    """A checkpoint's rollouts with their policy-gradient weights, and per prompt the
    :class:`nice_kit.policy.PromptWeights` (signal, reference weight, note)."""
    df, per_prompt = p.rollout_weights(ckpt)
    return df.assign(prompt_id=df["prompt_id"].astype(str)), {str(k): v for k, v in per_prompt.items()}


def policy_settings(p: Pipeline):
    """The run's policy settings (variant, baseline, topk ...)."""
    return p.cfg.policy


def rollout_k(p: Pipeline) -> int:
    """How many completions were sampled per target prompt."""
    return int(p.cfg.rollouts.k)


def run_metric(p: Pipeline) -> tuple[str, dict[str, Any]]:
    """The run's metric: its registered name (or a user function's name) and parameters."""
    name = p.cfg.metric.name
    if not isinstance(name, str):
        name = getattr(name, "__name__", type(name).__name__)
    return name, dict(p.cfg.metric.params or {})


def is_label_free(p: Pipeline) -> bool:
    return bool(p.cfg.data.label_free)


def available_columns(p: Pipeline) -> set[str]:
    """The target columns a metric can read in this run: the record columns every validation record
    has (not null), plus ``response`` (the reference answer) unless the run is label-free."""
    recs = list(p.target_val)
    if not recs:
        return set()
    cols = target_columns(p, recs)
    return {name for name, values in cols.items() if all(v is not None for v in values)}


# ------------------------------------------------------------------ what tells examples apart
def _common_prefix(texts: list[str]) -> str:
    first, last = min(texts), max(texts)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def _wordy(token: str) -> bool:
    """A token of boilerplate: it has a letter and no digit ("multiplication:", not "8" or "*")."""
    return any(c.isalpha() for c in token) and not any(c.isdigit() for c in token)


def _boilerplate(texts: list[str]) -> tuple[int, int]:
    """How many characters every text of ``texts`` shares at its start and at its end, cut back to
    whole words of text (shared operands, as "8 *" of "8 * 7" and "8 * 3", are not boilerplate)."""
    if len(texts) < 2:
        return 0, 0
    pre = _common_prefix(texts)
    while pre and not (pre[-1].isspace() and _wordy((pre.split() or [""])[-1])):
        pre = pre[:-1]
    rest = [t[len(pre):] for t in texts]
    suf = _common_prefix([t[::-1] for t in rest])[::-1]
    while suf and (any(len(t) > len(suf) and t[-len(suf) - 1].isalnum() and suf[0].isalnum() for t in rest)
                   or (not suf[0].isspace() and not _wordy(suf.split()[0])
                       and any(c.isalnum() for c in suf.split()[0]))):
        suf = suf[1:]  # inside a word, or an operand: keep it
    return len(pre), len(suf)


def distinguishing_text(texts: list[str], groups: list[Any] | None = None) -> list[str]:
    """Each text without the boilerplate it shares with the other texts of its group (``groups``, e.g.
    the task column; default: one group): "Solve the following multiplication: 8 * 7. Give only the
    result as your final answer." becomes "8 * 7". A text with nothing left, or alone in its group,
    stays whole."""
    texts = [str(t) for t in texts]
    groups = groups if groups is not None else [0] * len(texts)
    by_group: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g if g is None or not isinstance(g, float) or g == g else None, []).append(i)
    out = list(texts)
    for rows in by_group.values():
        members = [texts[i] for i in rows]
        lo, hi = _boilerplate(members)
        for i in rows:
            core = texts[i][lo:len(texts[i]) - hi].strip().strip(".:").strip()
            out[i] = core or texts[i]
    return out


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def response_correct(response: Any, answer: Any) -> bool | None:
    """Whether ``response`` gives ``answer`` (the pool's ``answer`` column): equal after trimming
    whitespace and case, or equal as numbers; None when there is no answer to compare with."""
    if answer is None or (isinstance(answer, float) and answer != answer) or response is None:
        return None
    got, want = str(response).strip(), str(answer).strip()
    if got.lower() == want.lower():
        return True
    a, b = _number(got), _number(want)
    return a is not None and b is not None and a == b


def add_text_columns(frame: pd.DataFrame, answers: dict[str, Any] | None = None) -> pd.DataFrame:
    """``frame`` (a :func:`pool_frame`) with ``prompt_core`` (the part of the prompt that tells it
    from the other prompts of its task, :func:`distinguishing_text`) and, when ``answers`` (id ->
    the pool's ``answer``) holds any, ``correct`` (:func:`response_correct`)."""
    df = frame.copy()
    groups = df["task"].tolist() if "task" in df.columns else None
    df["prompt_core"] = distinguishing_text(df["prompt"].astype(str).tolist(), groups)
    if answers and any(v is not None for v in answers.values()):
        df["correct"] = [response_correct(r, answers.get(i)) for i, r in zip(df["id"], df["response"])]
    return df


def pool_answers(p: Pipeline) -> dict[str, Any]:
    """id -> the pool record's ``answer`` column (None where it has none)."""
    return {r.id: r.columns.get("answer") for r in p.pool}


def target_labels(p: Pipeline) -> dict[str, str]:
    """Target prompt id -> the part of its text that tells it from the other prompts of its subtask."""
    recs = list(p.target_val)
    col = p.cfg.data.subtask_column
    groups = [r.columns.get(col) if col else None for r in recs]
    return dict(zip([r.id for r in recs], distinguishing_text([r.prompt for r in recs], groups)))


# ------------------------------------------------------------------------------- what-ifs
def what_if(p: Pipeline, changes: dict[str, Any], compute: bool = False):
    """:func:`nice_kit.whatif.what_if` of ``p`` (``compute=False``: only stored vectors are read, and
    a missing per-completion stage raises the RuntimeError that names it)."""
    from nice_kit.whatif import what_if as run_what_if

    return run_what_if(p, changes, compute=compute)


def harmful_share(p: Pipeline, ids: list[str]) -> float | None:
    """The share of ``ids`` the pool flags ``harmful`` (None when the pool has no such flag)."""
    flags = {r.id: r.columns.get("harmful") for r in p.pool}
    if not any(v is not None for v in flags.values()) or not ids:
        return None
    return float(sum(bool(flags.get(i)) for i in ids) / len(ids))


def model_problem(p: Pipeline) -> str | None:
    """Why this pipeline cannot compute new gradients (None when it can): it holds no model and the
    config's model does not load offline."""
    if p.holds_model:
        return None
    from nice_kit.models import check_model

    try:
        check_model(p.cfg.model)
    except Exception as err:  # noqa: BLE001 - the reason is shown to the user
        return f"the model {p.cfg.model!r} is not available here: {err}"
    return None


def adopt_what_if(p: Pipeline, what_if_result) -> Pipeline:
    """Make a what-if the run's own, through the checked stages: recompute NICE's validation gradients
    under the what-if's config (rollouts re-scored by a new metric, never re-sampled), then the scores
    and selections, and only then write the new ``config.json``. Needs the model: refused with a
    RuntimeError naming it when the pipeline holds none and the config's does not load offline (the
    run is then left as it was). Returns the run's pipeline under the new config."""
    cfg = what_if_result.config
    if cfg is None:
        raise ValueError("this what-if carries no config to adopt")
    problem = model_problem(p)
    if problem:
        raise RuntimeError(f"{p.run_dir}: adopting the what-if recomputes NICE's validation gradients, which needs "
                           f"the model, and {problem}. Open the run with its model (a live Pipeline), or compute "
                           "with the changed config: nice-kit run --config ...")
    new = p.with_config(cfg)
    from nice_kit.warmup import load_adapter_weights

    try:  # before any stage is touched: a model that does not fit the run's adapters leaves the run as it was
        load_adapter_weights(new.model, new.checkpoints[0])
    except Exception as err:
        raise RuntimeError(
            f"{p.run_dir}: the model {cfg.model!r} does not fit the run's warmup adapters ({type(err).__name__}), so "
            "the run was made with another model (a fast-mode run's tiny model is not stored with it). Adopt from "
            "the pipeline that made the run (a live Pipeline). Nothing was changed.") from err
    new.validation_gradients("nice")
    scores = new.scores()
    new.select(scores)
    return new.with_config(cfg, write_config=True)  # only now the run's config.json changes


def pool_labels(p: Pipeline) -> dict[str, str]:
    """Pool id -> the part of its prompt that tells it from the other prompts of its task."""
    recs = list(p.pool)
    groups = [r.columns.get("task") for r in recs]
    return dict(zip([r.id for r in recs], distinguishing_text([r.prompt for r in recs], groups)))
