"""Does the selection help? Fine-tune the base model on a subset and score held-out test prompts.

``compare`` trains one fresh LoRA per (method, seed) on random / LESS / NICE selections (and the full
pool), decodes the test prompts greedily, scores them with the run's metric and measures the
reference answers' next-token loss. Each finished row is saved at once to
``evaluation/results.csv``, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import keys
from . import metrics as rewards_mod
from .data import Record, collate, file_digest, tokenize_records
from .gradients import mean_nll_sequence, weighted_nll
from .influence import random_subset, top_fraction
from .rollouts import greedy_completions
from .runs import ROW_CHECK, atomic_write_text, checked_rows, fingerprint, row_check
from .settings import EVAL_METHODS
from .warmup import reset_lora, train_lora  # noqa: F401  (reset_lora: re-exported)


@torch.no_grad()
def reference_loss(model, tokenizer, records: list[Record], max_length: int, batch_size: int = 16) -> float:
    """Mean over records of the mean token NLL of the reference answer (the LESS proxy)."""
    toks, _ = tokenize_records(tokenizer, records, max_length)
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for s in range(0, len(toks), batch_size):
        part = toks[s:s + batch_size]
        seqs = [mean_nll_sequence(t, i) for i, t in enumerate(part)]
        batch = collate(part, tokenizer.pad_token_id)
        n = batch["input_ids"].shape[1]
        w = torch.tensor([q.weights + [0.0] * (n - len(q.weights)) for q in seqs])
        losses += weighted_nll(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                               w.to(device)).tolist()
    return float(np.mean(losses))


def evaluate_model(pipeline, records: list[Record]) -> dict[str, float]:
    """Greedy completions of ``records`` scored with the run's metric (+ reference loss when labelled)."""
    ev = pipeline.cfg.evaluation
    model, tok = pipeline.model, pipeline.tokenizer
    completions = greedy_completions(model, tok, records, ev.max_new_tokens, stop=tuple(pipeline.cfg.rollouts.stop))
    cols, _, _ = pipeline.metric_columns(records)
    scores = rewards_mod.score(pipeline.metric(), [r.prompt for r in records], completions, **cols)
    out = {"metric": float(np.mean(scores)), "n_test": len(records)}
    if not pipeline.cfg.data.label_free:
        out["loss"] = reference_loss(model, tok, records, pipeline.cfg.data.max_length)
    return {**out, **answer_diversity(completions, "answer")}


COLLAPSE_SHARE = 0.5  # a fine-tuned model that gives one completion to half the test prompts or more has collapsed


def answer_diversity(texts: list[str], prefix: str) -> dict:
    """How varied ``texts`` are (each stripped of surrounding white space): ``<prefix>_top_share`` (the
    share of the most common one), ``<prefix>_distinct`` (how many differ) and ``<prefix>_top`` (the most
    common one, ties broken by first occurrence)."""
    if not texts:
        return {f"{prefix}_top_share": float("nan"), f"{prefix}_distinct": 0, f"{prefix}_top": ""}
    counts = pd.Series([str(t).strip() for t in texts]).value_counts(sort=True)
    return {f"{prefix}_top_share": float(counts.iloc[0] / len(texts)), f"{prefix}_distinct": int(len(counts)),
            f"{prefix}_top": str(counts.index[0])}


def is_collapse(answer_top_share: float) -> bool:
    """Whether a fine-tuned model's test completions are a collapse: one completion for at least
    :data:`COLLAPSE_SHARE` of the test prompts (NaN, not recorded, is not called one)."""
    return bool(np.isfinite(answer_top_share) and answer_top_share >= COLLAPSE_SHARE)


def subset_ids(pipeline, method: str, fraction: float, seed: int) -> list[str]:
    """The training subset of ``method``: the pool (``full``), a random subset drawn with ``seed``
    (``random``), or the top ``fraction`` by the run's (checked, current) scores."""
    ids = [r.id for r in pipeline.pool]
    if method == "full":
        return ids
    if method == "random":
        return random_subset(ids, fraction, seed)
    scores = pipeline.read_scores()  # refuses scores computed from other settings
    if method not in scores.columns:
        raise RuntimeError(f"{pipeline.run_dir / 'scores.csv'} has no {method!r} column; run that method's stages first")
    return top_fraction(scores["id"].tolist(), scores[method].to_numpy(), fraction)


def finetune_and_evaluate(pipeline, train_ids: list[str], seed: int, test: list[Record]) -> dict[str, float]:
    """A fresh LoRA on the base model, trained on ``train_ids``, scored on ``test``."""
    ev = pipeline.cfg.evaluation
    by_id = {r.id: r for r in pipeline.pool}
    examples, _ = tokenize_records(pipeline.tokenizer, [by_id[i] for i in train_ids], pipeline.cfg.data.max_length)
    model = pipeline.model
    reset_lora(model, seed)
    train_lora(model, examples, epochs=ev.epochs, lr=ev.lr, batch_size=ev.batch_size,
               pad_id=pipeline.tokenizer.pad_token_id, seed=seed, desc=f"finetune ({len(examples)} ex)")
    result = evaluate_model(pipeline, test)
    reset_lora(model, seed)
    return {**result, **answer_diversity([by_id[i].response for i in train_ids], "train")}


def metric_label(pipeline) -> str:
    """The run's metric as plots name it (a registered name, or a function's name)."""
    name = pipeline.cfg.metric.name
    return name if isinstance(name, str) else getattr(name, "__name__", type(name).__name__)


def evaluation_inputs(pipeline, test: list[Record]) -> dict:
    """Everything a fine-tune-and-score result depends on besides the subset and the seed."""
    c = pipeline.cfg
    out = {"model": c.model, "eval": {k: v for k, v in c.evaluation.__dict__.items()
                                      if k not in ("seeds", "selection_seeds", "methods", "fraction")},
           "metric": keys.metric_key(pipeline.cfg), "lora": c.lora.__dict__, "max_length": c.data.max_length,
           "stop": list(c.rollouts.stop), "pool": pipeline.pool_digest, "label_free": c.data.label_free,
           "test": [r.id for r in test], "test digest": file_digest(c.data.target_test)}
    if c.data.columns:  # the mapping changes what the records hold (absent when empty: older keys still match)
        out["data.columns"] = c.data.columns
    return out


def selection_run(pipeline, selection_seed: int):
    """The pipeline whose selection ``selection_seed`` names: the run itself for 0, else a sibling run
    (``<run>/selection_seeds/s<k>``) with run seed + k and projection seed + k, sharing the model."""
    if selection_seed == 0:
        return pipeline
    cfg = copy.deepcopy(pipeline.cfg)
    cfg.seed += selection_seed
    cfg.projection.seed += selection_seed
    return pipeline.sibling(pipeline.run_dir / "selection_seeds" / f"s{selection_seed}", cfg)


def compare(pipeline, methods: list[str] | None = None, fraction: float | None = None,
            seeds: list[int] | None = None, selection_seeds: list[int] | None = None, quick: bool = False,
            full: bool | None = None, on_result: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """Fine-tune on each method's selection and score the held-out test prompts.

    Tidy results (method, fraction, selection_seed, seed, metric, loss, n_train, n_test, the answer
    diversity of the fine-tuned model's test completions and of the training responses, see
    :func:`answer_diversity`), one row per (method, selection seed, fine-tuning seed); resumable, saved
    as ``evaluation/results.csv``. A selection seed re-runs the selection (see :func:`selection_run`:
    warmup subset, LoRA initialisation, rollouts and projection all change), so the rows show both
    sources of variance; ``random`` draws its subset with the run's seed + the selection seed (the
    seed of that selection's run, the one its ``diagnostics.csv`` names), ``full`` has one selection.

    ``quick=True`` is the setting for a notebook: one fine-tuning seed (the first of the config's, unless
    ``seeds`` is given) and no full-pool row unless ``full=True`` or ``methods`` names ``full`` (each full-pool
    training costs about seven selections', :func:`training_cost`). ``full=False`` drops that row in any mode. The progress bar's
    estimate weights each training by its size (:func:`training_cost`), and each result is logged as it
    finishes (and passed to ``on_result``, a row as a dict, when given)."""
    ev = pipeline.cfg.evaluation
    explicit = methods is not None
    methods = list(methods or ev.methods)
    if full is None:  # quick leaves the full pool out unless asked for by name
        full = "full" in methods if explicit or not quick else False
    if full and "full" not in methods:
        methods.append("full")
    if not full:
        methods = [m for m in methods if m != "full"]
    if pipeline.cfg.data.label_free:
        methods = [m for m in methods if m != "less"]
    bad = set(methods) - set(EVAL_METHODS)
    if bad:
        raise ValueError(f"unknown evaluation method(s) {sorted(bad)}; choose from {EVAL_METHODS}")
    fraction = fraction or ev.fraction
    seeds = seeds if seeds is not None else (list(ev.seeds)[:1] if quick else list(ev.seeds))
    selection_seeds = selection_seeds if selection_seeds is not None else list(ev.selection_seeds)
    test = pipeline.target_test[: ev.max_test or None]
    folder = pipeline.run_dir / "evaluation"
    folder.mkdir(exist_ok=True)
    path = folder / "results.csv"
    rows = _read_rows(path)
    base = evaluation_inputs(pipeline, test)
    jobs = []
    selectors = [m for m in methods if m in ("less", "nice")]
    for s in selection_seeds:
        run = pipeline
        if selectors and s != 0:
            run = selection_run(pipeline, s)
            pipeline.log(f"step: selection seed {s} (run seed {run.cfg.seed}, projection seed "
                         f"{run.cfg.projection.seed}) in {run.run_dir}")
            run.run(selectors)
        for method in methods:
            if method == "full" and s != selection_seeds[0]:
                continue
            ids = (subset_ids(run, method, fraction, 0) if method in selectors
                   else subset_ids(pipeline, method, fraction, pipeline.cfg.seed + s))
            for seed in seeds:
                key = fingerprint({**base, "ids": ids, "seed": seed})
                jobs.append((method, s, seed, ids, key))
    done = {r["key"] for r in rows}
    todo = [j for j in jobs if j[4] not in done]
    progress = TrainingProgress([training_cost(len(j[3]), ev.epochs, len(test)) for j in todo], "evaluate")
    for (method, s, seed, ids, key), cost in zip(todo, progress.costs):
        pipeline.log(f"step: evaluate {method} (selection seed {s}, fine-tuning seed {seed}, {len(ids)} examples)")
        result, cpu_s, wall_s = _timed(finetune_and_evaluate, pipeline, ids, seed, test)
        row = {"method": method, "fraction": 1.0 if method == "full" else fraction, "selection_seed": s,
               "seed": seed, **result, "n_train": len(ids), "cpu_s": cpu_s, "wall_s": wall_s, "key": key}
        rows.append(_with_check(row))
        _write_rows(path, rows)
        progress.done(cost, f"{method} (selection seed {s}, seed {seed}, {len(ids)} examples): "
                      + result_line(row, metric_label(pipeline)))
        if on_result is not None:
            on_result({k: v for k, v in row.items() if k != "key"})
    progress.close()
    out = []
    by_key = {r["key"]: r for r in rows}
    for method, s, seed, ids, key in jobs:  # this call's rows, labelled with this call's seeds
        out.append({**by_key[key], "method": method, "selection_seed": s, "seed": seed})
    df = pd.DataFrame(out).drop(columns=["key", ROW_CHECK], errors="ignore").reset_index(drop=True)
    df.attrs["metric"] = metric_label(pipeline)
    return df


def _with_check(row: dict) -> dict:
    """``row`` with its checksum (:func:`nice_kit.runs.row_check`) in the ``check`` column."""
    row = {k: v for k, v in row.items() if k != ROW_CHECK}
    return {**row, ROW_CHECK: row_check(row)}


def _read_rows(path) -> list[dict]:
    """The stored rows of an evaluation table whose checksums match (a damaged row is dropped, with a
    log line, and recomputed; an unreadable table is recomputed whole)."""
    if not path.exists():
        return []
    try:
        rows = read_rows(path).to_dict("records")
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        from .runs import log

        log(f"integrity: {path}: unreadable ({err}) -- recomputing its rows")
        return []
    return checked_rows(rows, path)


def _write_rows(path, rows: list[dict]) -> None:
    atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))


# ---- progress weighted by training size, results as they finish

# One test prompt's greedy decoding and reference loss, in units of one training example-epoch. Measured from the
# progress bars of the first 5 `nice-kit lds` trainings on the bundled run (SmolLM2-135M, 31 examples x 3 epochs,
# 64 test prompts, 1 CPU thread, 2026-12-03): 0.50-0.82 per training, mean 0.65. See :func:`training_cost`.
EVAL_COST_PER_TEST = 0.65


def training_cost(n_train: int, epochs: int, n_test: int) -> float:
    """A fine-tune-and-score job's expected cost in training example-epochs: ``n_train * epochs`` for the
    training plus :data:`EVAL_COST_PER_TEST` per test prompt for scoring. Progress bars count these units,
    so their estimate of the time left weights a full-pool training by its size."""
    return float(n_train * epochs + EVAL_COST_PER_TEST * n_test)


class TrainingProgress:
    """A tqdm bar over trainings that counts :func:`training_cost` units (its time-left estimate is then
    right for trainings of different sizes) and says how many trainings remain; :meth:`done` also
    prints a finished training's result line above the bar."""

    def __init__(self, costs: list[float], desc: str):
        self.costs, self.left, self.name = list(costs), len(costs), desc
        self.bar = tqdm(total=round(sum(costs), 1), desc=self._desc(), unit="ex-epoch", disable=not costs,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, about {remaining} left")

    def _desc(self) -> str:
        return f"{self.name} ({self.left} of {len(self.costs)} training{'s' if len(self.costs) != 1 else ''} left)"

    def done(self, cost: float, line: str = "") -> None:
        self.left -= 1
        if line:
            self.bar.write(line)
        self.bar.set_description_str(self._desc(), refresh=False)
        self.bar.update(cost)

    def close(self) -> None:
        self.bar.close()


def _timed(fn, *args):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.process_time() - c0, time.perf_counter() - t0


TEXT_COLUMNS = ("answer_top", "train_top")


def read_rows(path: Path) -> pd.DataFrame:
    """A stored table of trainings (``evaluation/results.csv``, ``evaluation/lds.csv``), its text columns
    (the most common completion and response) read as text, not numbers."""
    df = pd.read_csv(path, converters={c: str for c in TEXT_COLUMNS}, dtype={"key": str, ROW_CHECK: str})
    for c in TEXT_COLUMNS:  # an empty completion is stored as an empty field, which pandas reads as NaN
        if c in df.columns:
            df[c] = df[c].where(df[c].notna() | df[c.replace("_top", "_top_share")].isna(), "")
    return df


def result_line(row: dict, metric: str = "metric") -> str:
    """One finished training in words: metric, loss and the answer diversity, a collapse called one."""
    text = f"{metric} {row['metric']:.3f}"
    if "loss" in row and row["loss"] == row["loss"]:
        text += f", reference loss {row['loss']:.3f}"
    share = row.get("answer_top_share", float("nan"))
    if share == share:
        top = _short_text(row.get("answer_top", ""))
        text += (f"; {row.get('answer_distinct')} distinct completions, the most common ({top!r}) on "
                 f"{share:.0%} of test prompts")
        if is_collapse(share):
            text += ": COLLAPSE (one answer for most prompts)"
    return text


def _short_text(text, n: int = 24) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per method and fraction: the metric's (and loss's) mean over every run and its standard error,
    and the two sources of variance: ``sd_selection`` (the spread of the per-selection means over
    selection seeds) and ``sd_finetune`` (the pooled spread over fine-tuning seeds within a selection).

    With one selection the standard error is that of the runs' mean. With several, the runs of one
    selection are not independent draws (they share its subset), so the standard error is that of the
    per-selection means: their spread over ``sqrt(n_selections)``, which counts both sources."""
    def sem(x):
        return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")

    def nested_sem(g, column):
        means = g.groupby("selection_seed")[column].mean()
        return sem(means) if len(means) > 1 else sem(g[column])

    results = results.copy()
    if "selection_seed" not in results.columns:
        results["selection_seed"] = 0
    rows = []
    for (method, fraction), g in results.groupby(["method", "fraction"], sort=False):
        row = {"method": method, "fraction": fraction, "metric_mean": float(g["metric"].mean()),
               "metric_se": nested_sem(g, "metric"), "n_runs": len(g),
               "n_selections": g["selection_seed"].nunique(), "n_finetune_seeds": g["seed"].nunique()}
        per_sel = g.groupby("selection_seed")["metric"]
        means = per_sel.mean()
        row["sd_selection"] = float(means.std(ddof=1)) if len(means) > 1 else float("nan")
        within = [(len(x) - 1, float(np.var(x, ddof=1))) for _, x in per_sel if len(x) > 1]
        dof = sum(d for d, _ in within)
        row["sd_finetune"] = math.sqrt(sum(d * v for d, v in within) / dof) if dof else float("nan")
        if "loss" in g.columns:
            row["loss_mean"], row["loss_se"] = float(g["loss"].mean()), nested_sem(g, "loss")
        rows.append(row)
    return pd.DataFrame(rows)


def diversity_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per method (and fraction): the metric's mean beside the answer diversity of the fine-tuned
    models' test completions (``answer_top_share``: the most common completion's share, mean over runs;
    ``answer_distinct``), the most common completion, the selection's own (``train_top_share``), and
    ``collapse``: how many runs gave one completion to at least half the test prompts. Columns the
    results lack (rows stored before diversity was recorded) are left out."""
    rows = []
    for (method, fraction), g in results.groupby(["method", "fraction"], sort=False):
        row = {"method": method, "fraction": fraction, "runs": len(g), "metric": float(g["metric"].mean())}
        if "loss" in g and g["loss"].notna().any():
            row["loss"] = float(g["loss"].mean())
        if "answer_top_share" in g and g["answer_top_share"].notna().any():
            share = g["answer_top_share"].dropna()
            row["answer_top_share"] = float(share.mean())
            row["answer_distinct"] = float(g["answer_distinct"].mean())
            tops = g["answer_top"].dropna().astype(str) if "answer_top" in g else pd.Series([], dtype=str)
            row["most_common"] = tops.mode().iloc[0] if len(tops) else ""
            n = sum(is_collapse(x) for x in share)
            row["collapse"] = f"COLLAPSE in {n} of {len(share)}" if n else f"no ({len(share)} run{'s' if len(share) != 1 else ''})"
        if "train_top_share" in g and g["train_top_share"].notna().any():
            row["train_top_share"] = float(g["train_top_share"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


# ---- the linear datamodeling score (LDS): does the sum of an example's scores predict training's effect?

LDS_TARGETS = ("metric", "loss")


@dataclass
class LDSResult:
    """What :func:`lds` measured.

    * ``table``: one row per (method, target): ``lds`` (Spearman of predicted against actual over the
      subsets), ``ci_low``/``ci_high`` (bootstrap 95% interval over subsets), ``n_subsets``, ``n_seeds``.
      For ``target="loss"`` the actual effect is *minus* the test reference loss, so for both targets a
      positive LDS means "a higher summed score predicts a better model".
    * ``differences``: per target and pair of methods, ``a - b`` with its paired bootstrap interval.
    * ``subsets``: one row per subset: its size, the test metric and loss (means over seeds), the answer
      diversity, and ``pred_<method>``, the sum of the method's scores over the subset.
    * ``trainings``: one row per training (subset x seed), as stored in ``evaluation/lds.csv``.
    """

    table: pd.DataFrame
    differences: pd.DataFrame
    subsets: pd.DataFrame
    trainings: pd.DataFrame
    metric: str = "metric"
    fraction: float = 0.5
    methods: list[str] = field(default_factory=list)

    @property
    def cpu_minutes(self) -> float:
        """CPU time of the stored trainings (all threads of the process), in minutes."""
        return float(self.trainings["cpu_s"].sum() / 60) if "cpu_s" in self.trainings else float("nan")


def rank_correlation(x, y) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties get their average rank).
    NaN when fewer than two pairs or when either side is constant."""
    a, b = pd.Series(np.asarray(x, dtype=float)), pd.Series(np.asarray(y, dtype=float))
    if len(a) != len(b):
        raise ValueError(f"rank_correlation: {len(a)} values against {len(b)}")
    ok = a.notna() & b.notna()
    if ok.sum() < 2:
        return float("nan")
    ra, rb = a[ok].rank().to_numpy(), b[ok].rank().to_numpy()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def lds_subset(ids: list[str], fraction: float, subset_seed: int, index: int) -> list[str]:
    """Random subset ``index`` of the pool for :func:`lds` (sorted ids). It depends only on the pool,
    ``fraction``, ``subset_seed`` and ``index``, so asking for more subsets keeps the earlier ones."""
    if not 0 < fraction <= 1:
        raise ValueError(f"lds: fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * len(ids))))
    rng = np.random.default_rng([30_000 + subset_seed, index])
    return sorted(rng.choice(ids, size=k, replace=False).tolist())


def _lds_scores(run, methods, measurements, extra_scores) -> pd.DataFrame:
    scores = run.read_scores(measurements)  # checked against the current config (and the measurements passed)
    if extra_scores is not None:
        if "id" not in extra_scores.columns:
            raise ValueError("lds: extra_scores needs an 'id' column (pool ids) beside its score columns")
        clash = [c for c in extra_scores.columns if c != "id" and c in scores.columns]
        if clash:
            raise ValueError(f"lds: extra_scores repeats column(s) {clash} of {run.run_dir / 'scores.csv'}; rename them")
        extra = extra_scores.assign(id=extra_scores["id"].astype(str))
        missing = set(scores["id"]) - set(extra["id"])
        if missing:
            raise ValueError(f"lds: extra_scores has no score for {len(missing)} pool example(s), e.g. {sorted(missing)[:3]}")
        scores = scores.merge(extra, on="id", how="left")
    names = [c for c in scores.columns if c != "id"]
    methods = [getattr(m, "name", m) for m in (methods or names)]
    unknown = [m for m in methods if m not in names]
    if unknown:
        raise ValueError(f"lds: no score column {unknown} in {run.run_dir / 'scores.csv'} (it has {names}); "
                         "run those methods first, or pass them as extra_scores")
    for m in methods:
        if scores[m].isna().any():
            raise ValueError(f"lds: score column {m!r} has NaN for {int(scores[m].isna().sum())} example(s)")
    return scores.set_index("id")[methods]


def lds(run, n_subsets: int = 32, fraction: float = 0.5, seeds: list[int] | None = None,
        methods: list | None = None, measurements: list | None = None, extra_scores: pd.DataFrame | None = None,
        n_bootstrap: int = 1000, subset_seed: int = 0, on_result: Callable[[dict], None] | None = None) -> LDSResult:
    """The linear datamodeling score of every score column of ``run``: train on ``n_subsets`` random
    subsets of the pool (each ``fraction`` of it, :func:`lds_subset`), each with the run's evaluation
    settings for every fine-tuning seed in ``seeds`` (default: the first of the config's), and measure the
    test metric and the test reference loss. A method's predicted effect on a subset is the sum of its
    scores over the subset (higher predicts better for both targets); its LDS per target is the Spearman
    correlation of predicted against actual (minus the loss for ``loss``), with a bootstrap 95% interval
    over subsets (``n_bootstrap`` resamples, the same ones for every method, so differences are paired).

    ``methods`` picks score columns (default all in ``scores.csv``); a user's own measurement must be
    passed in ``measurements`` (as to :meth:`Pipeline.read_scores`) so its scores are checked;
    ``extra_scores`` (a DataFrame with ``id`` and more score columns, say a what-if) adds columns.
    Each training is one row of ``evaluation/lds.csv``, stored as it finishes and reused while
    everything it came from is unchanged (the same key as :func:`compare`'s rows): a killed call resumes."""
    if n_subsets < 3:
        raise ValueError(f"lds: n_subsets must be at least 3 (a rank correlation over subsets), got {n_subsets}")
    ev = run.cfg.evaluation
    seeds = list(seeds) if seeds is not None else list(ev.seeds)[:1]
    if not seeds:
        raise ValueError("lds: seeds must not be empty")
    scores = _lds_scores(run, methods, measurements, extra_scores)
    methods = list(scores.columns)
    test = run.target_test[: ev.max_test or None]
    base = evaluation_inputs(run, test)
    pool_ids = [r.id for r in run.pool]
    subsets = [lds_subset(pool_ids, fraction, subset_seed, i) for i in range(n_subsets)]
    folder = run.run_dir / "evaluation"
    folder.mkdir(exist_ok=True)
    path = folder / "lds.csv"
    rows = _read_rows(path)
    done = {r["key"] for r in rows}
    jobs = [(i, seed, ids, fingerprint({**base, "ids": ids, "seed": seed}))
            for i, ids in enumerate(subsets) for seed in seeds]
    todo = [j for j in jobs if j[3] not in done]
    name = metric_label(run)
    if todo:
        run.log(f"step: lds: {len(todo)} of {len(jobs)} trainings to do ({n_subsets} subsets of {len(subsets[0])} "
                f"examples x {len(seeds)} seed{'s' if len(seeds) != 1 else ''})")
    progress = TrainingProgress([training_cost(len(j[2]), ev.epochs, len(test)) for j in todo], "lds")
    for (i, seed, ids, key), cost in zip(todo, progress.costs):
        result, cpu_s, wall_s = _timed(finetune_and_evaluate, run, ids, seed, test)
        row = {"subset": i, "subset_seed": subset_seed, "fraction": fraction, "seed": seed, **result,
               "n_train": len(ids), "cpu_s": cpu_s, "wall_s": wall_s, "key": key}
        rows.append(_with_check(row))
        _write_rows(path, rows)
        progress.done(cost, f"subset {i} (seed {seed}, {len(ids)} examples): {result_line(row, name)}")
        if on_result is not None:
            on_result({k: v for k, v in row.items() if k != "key"})
    progress.close()
    by_key = {r["key"]: r for r in rows}
    trainings = pd.DataFrame([{**by_key[key], "subset": i, "subset_seed": subset_seed, "fraction": fraction,
                               "seed": seed} for i, seed, ids, key in jobs]).drop(columns=["key", ROW_CHECK],
                                                                                      errors="ignore")
    return lds_from_trainings(trainings, subsets, scores, n_bootstrap=n_bootstrap, metric=name, fraction=fraction)


def lds_from_trainings(trainings: pd.DataFrame, subsets: list[list[str]], scores: pd.DataFrame,
                       n_bootstrap: int = 1000, metric: str = "metric", fraction: float = float("nan"),
                       bootstrap_seed: int = 0) -> LDSResult:
    """The LDS tables from finished trainings (``subset``, ``metric``, optionally ``loss`` per row),
    the subsets' ids (``subsets[i]`` for ``subset == i``) and ``scores`` (indexed by id, one column per
    method). :func:`lds` calls it; it is public so a hand-made case can be checked."""
    methods = list(scores.columns)
    keep = [c for c in ("metric", "loss", "answer_top_share", "answer_distinct", "train_top_share", "train_distinct")
            if c in trainings.columns]
    per = trainings.groupby("subset")[keep].mean()
    per.insert(0, "n_train", [len(subsets[i]) for i in per.index])
    per.insert(1, "n_seeds", trainings.groupby("subset").size())
    for m in methods:
        col = scores[m]
        per[f"pred_{m}"] = [float(col.loc[subsets[i]].sum()) for i in per.index]
    per = per.reset_index()
    targets = [t for t in LDS_TARGETS if t in per.columns and per[t].notna().all()]
    actual = {t: (per[t] if t == "metric" else -per[t]).to_numpy(dtype=float) for t in targets}
    pred = {m: per[f"pred_{m}"].to_numpy(dtype=float) for m in methods}
    rng = np.random.default_rng(bootstrap_seed)
    n = len(per)
    draws = [rng.integers(0, n, n) for _ in range(n_bootstrap)]
    boot = {(m, t): np.array([rank_correlation(pred[m][d], actual[t][d]) for d in draws])
            for m in methods for t in targets}

    def interval(values):
        values = values[np.isfinite(values)]
        if len(values) < max(10, n_bootstrap // 2):
            return float("nan"), float("nan")
        lo, hi = np.percentile(values, [2.5, 97.5])
        return float(lo), float(hi)

    table = []
    for m in methods:
        for t in targets:
            lo, hi = interval(boot[(m, t)])
            table.append({"method": m, "target": t, "lds": rank_correlation(pred[m], actual[t]), "ci_low": lo,
                          "ci_high": hi, "n_subsets": n, "n_seeds": int(per["n_seeds"].min()) if n else 0})
    diffs = []
    for t in targets:
        for ia, a in enumerate(methods):
            for b in methods[ia + 1:]:
                lo, hi = interval(boot[(a, t)] - boot[(b, t)])
                diffs.append({"target": t, "a": a, "b": b,
                              "difference": rank_correlation(pred[a], actual[t]) - rank_correlation(pred[b], actual[t]),
                              "ci_low": lo, "ci_high": hi})
    return LDSResult(table=pd.DataFrame(table, columns=["method", "target", "lds", "ci_low", "ci_high", "n_subsets",
                                                        "n_seeds"]),
                     differences=pd.DataFrame(diffs, columns=["target", "a", "b", "difference", "ci_low", "ci_high"]),
                     subsets=per, trainings=trainings, metric=metric, fraction=fraction, methods=methods)


def describe_lds(result: LDSResult) -> str:
    """The LDS table in plain words: which method's scores rank the subsets' outcomes, for each target,
    and whether the intervals let one say it."""
    t = result.table.set_index(["method", "target"])
    lines = []
    names = {"metric": f"the test {result.metric}", "loss": "the test reference loss"}
    for target in [x for x in LDS_TARGETS if x in set(result.table["target"])]:
        parts = []
        for m in result.methods:
            r = t.loc[(m, target)]
            if not np.isfinite(r["ci_low"]):
                verdict = "no interval (too few subsets or constant values)"
            elif r["ci_low"] > 0:
                verdict = "predicts it (interval above 0)"
            elif r["ci_high"] < 0:
                verdict = "predicts it backwards (interval below 0)"
            else:
                verdict = "no better than chance (interval includes 0)"
            parts.append(f"{m.upper() if m in ('less', 'nice') else m} {r['lds']:+.2f} "
                         f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]: {verdict}")
        lines.append(f"Predicting {names[target]} over {int(result.table['n_subsets'].iloc[0])} random subsets: "
                     + "; ".join(parts) + ".")
        d = result.differences
        for _, r in d[d["target"] == target].iterrows():
            if not np.isfinite(r["ci_low"]):
                continue
            sure = ("the interval excludes 0" if r["ci_low"] > 0 or r["ci_high"] < 0
                    else "the interval includes 0: not distinguishable with these subsets")
            lines.append(f"  {r['a']} - {r['b']}: {r['difference']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}], {sure}.")
    share = result.subsets.get("answer_top_share")
    if share is not None and share.notna().any():
        n_collapse = int(sum(is_collapse(x) for x in share))
        lines.append(f"Answer diversity: the most common test completion covers {share.median():.0%} of test prompts "
                     f"(median over subsets); {n_collapse} of {len(share)} subsets collapsed (one completion for "
                     f"{COLLAPSE_SHARE:.0%} or more).")
    return "\n".join(lines)


def checkpoint_curve(pipeline, split: str = "test") -> pd.DataFrame:
    """Reference loss and metric of the base model (epoch 0) and each warmup checkpoint on the target
    prompts: where next-token loss and the real metric move together, and where they part.
    Cached as ``evaluation/checkpoints_<split>.csv``."""
    from .warmup import load_adapter_weights

    records = pipeline.target_test if split == "test" else pipeline.target_val
    records = records[: pipeline.cfg.evaluation.max_test or None]
    folder = pipeline.run_dir / "evaluation"
    folder.mkdir(exist_ok=True)
    path = folder / f"checkpoints_{split}.csv"
    # the records' content (prompts, answers, every column the metric reads), not only their ids
    content = fingerprint([r.to_json() for r in records])
    key = fingerprint({"warmup": pipeline.warmup_inputs(), "metric": keys.metric_key(pipeline.cfg),
                       "ids": [r.id for r in records], "records": content,
                       "columns": pipeline.reward_inputs()["columns"], "label_free": pipeline.cfg.data.label_free,
                       "max_length": pipeline.cfg.data.max_length, "stop": list(pipeline.cfg.rollouts.stop),
                       "max_new_tokens": pipeline.cfg.evaluation.max_new_tokens})
    stored = _read_rows(path)
    if stored and len(stored) == len(pipeline.checkpoints) + 1 and all(r.get("key") == key for r in stored):
        df = pd.DataFrame(stored).drop(columns=["key", ROW_CHECK], errors="ignore")
        df.attrs["metric"] = metric_label(pipeline)
        return df
    if path.exists():
        pipeline.log(f"{path}: made from other inputs (other records, settings or checkpoints, or before its key "
                     "held the records' content) -- recomputing it")
    rows = []
    reset_lora(pipeline.model, pipeline.cfg.seed)
    rows.append({"epoch": 0, "lr": 0.0, **evaluate_model(pipeline, records)})
    for ckpt in pipeline.checkpoints:
        load_adapter_weights(pipeline.model, ckpt)
        rows.append({"epoch": ckpt.epoch, "lr": ckpt.lr, **evaluate_model(pipeline, records)})
    df = pd.DataFrame(rows)
    _write_rows(path, [_with_check({**r, "key": key}) for r in rows])
    df.attrs["metric"] = metric_label(pipeline)
    return df
