"""Does the selection help? Fine-tune the base model on a subset and score held-out test prompts.

``compare`` trains one fresh LoRA per (method, seed) on random / LESS / NICE selections (and the full
pool), decodes the test prompts greedily, scores them with the run's metric and measures the
reference answers' next-token loss. Each finished row is saved at once to
``evaluation/results.csv``, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics as rewards_mod
from .data import Record, collate, file_digest, tokenize_records
from .gradients import mean_nll_sequence, weighted_nll
from .influence import random_subset, top_fraction
from .rollouts import greedy_completions
from .runs import ROW_CHECK, atomic_write_text, checked_rows, fingerprint, row_check
from .warmup import reset_lora, train_lora  # noqa: F401  (reset_lora: re-exported)

EVAL_METHODS = ("random", "less", "nice", "full")


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
    return out


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
    return result


def metric_label(pipeline) -> str:
    """The run's metric as plots name it (a registered name, or a function's name)."""
    name = pipeline.cfg.metric.name
    return name if isinstance(name, str) else getattr(name, "__name__", type(name).__name__)


def evaluation_inputs(pipeline, test: list[Record]) -> dict:
    """Everything a fine-tune-and-score result depends on besides the subset and the seed."""
    c = pipeline.cfg
    out = {"model": c.model, "eval": {k: v for k, v in c.evaluation.__dict__.items()
                                      if k not in ("seeds", "selection_seeds", "methods", "fraction")},
           "metric": pipeline.metric_key(), "lora": c.lora.__dict__, "max_length": c.data.max_length,
           "stop": list(c.rollouts.stop), "pool": pipeline._pool_digest, "label_free": c.data.label_free,
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
            seeds: list[int] | None = None, selection_seeds: list[int] | None = None) -> pd.DataFrame:
    """Fine-tune on each method's selection and score the held-out test prompts.

    Tidy results (method, fraction, selection_seed, seed, metric, loss, n_train, n_test), one row per
    (method, selection seed, fine-tuning seed); resumable, saved as ``evaluation/results.csv``.
    A selection seed re-runs the selection (see :func:`selection_run`: warmup subset, LoRA
    initialisation, rollouts and projection all change), so the rows show both sources of variance;
    ``random`` draws its subset with the selection seed, ``full`` has one selection."""
    ev = pipeline.cfg.evaluation
    methods = methods or list(ev.methods)
    if pipeline.cfg.data.label_free:
        methods = [m for m in methods if m != "less"]
    bad = set(methods) - set(EVAL_METHODS)
    if bad:
        raise ValueError(f"unknown evaluation method(s) {sorted(bad)}; choose from {EVAL_METHODS}")
    fraction = fraction or ev.fraction
    seeds = seeds if seeds is not None else list(ev.seeds)
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
            ids = subset_ids(run, method, fraction, 0) if method in selectors else subset_ids(pipeline, method, fraction, s)
            for seed in seeds:
                key = fingerprint({**base, "ids": ids, "seed": seed})
                jobs.append((method, s, seed, ids, key))
    done = {r["key"] for r in rows}
    todo = [j for j in jobs if j[4] not in done]
    for method, s, seed, ids, key in tqdm(todo, desc="evaluate"):
        pipeline.log(f"step: evaluate {method} (selection seed {s}, fine-tuning seed {seed}, {len(ids)} examples)")
        result = finetune_and_evaluate(pipeline, ids, seed, test)
        rows.append(_with_check({"method": method, "fraction": 1.0 if method == "full" else fraction,
                                 "selection_seed": s, "seed": seed, **result, "n_train": len(ids), "key": key}))
        _write_rows(path, rows)
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
        rows = pd.read_csv(path, dtype={"key": str, ROW_CHECK: str}).to_dict("records")
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        from .runs import log

        log(f"integrity: {path}: unreadable ({err}) -- recomputing its rows")
        return []
    return checked_rows(rows, path)


def _write_rows(path, rows: list[dict]) -> None:
    atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))


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
    key = fingerprint({"warmup": pipeline.warmup_inputs(), "metric": pipeline.metric_key(),
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
