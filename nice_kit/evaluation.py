"""Does the selection help? Fine-tune the base model on a subset and score held-out test prompts.

``compare`` trains one fresh LoRA per (method, seed) on random / LESS / NICE selections (and the full
pool), decodes the test prompts greedily, scores them with the run's metric and measures the
reference answers' next-token loss. Each finished row is saved at once to
``evaluation/results.csv``, so an interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics as rewards_mod
from .data import Record, collate, tokenize_records
from .gradients import mean_nll_sequence, weighted_nll
from .influence import random_subset, top_fraction
from .rollouts import greedy_completions
from .runs import fingerprint
from .warmup import train_lora

EVAL_METHODS = ("random", "less", "nice", "full")


def reset_lora(model, seed: int) -> None:
    """Re-initialise every LoRA adapter (B = 0: the model equals the base model again)."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.reset_lora_parameters(name, True)


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
    cols = pipeline._columns(records)
    scores = rewards_mod.score(pipeline.metric(), [r.prompt for r in records], completions, **cols)
    out = {"metric": float(np.mean(scores)), "n_test": len(records)}
    if not pipeline.cfg.data.label_free:
        out["loss"] = reference_loss(model, tok, records, pipeline.cfg.data.max_length)
    return out


def subset_ids(pipeline, method: str, fraction: float, seed: int) -> list[str]:
    ids = [r.id for r in pipeline.pool]
    if method == "full":
        return ids
    if method == "random":
        return random_subset(ids, fraction, seed)
    path = pipeline.run_dir / "scores.csv"
    if not path.exists():
        raise RuntimeError(f"{path}: no scores yet; run the pipeline before evaluating {method!r}")
    scores = pd.read_csv(path, dtype={"id": str})
    if method not in scores.columns:
        raise RuntimeError(f"{path} has no {method!r} column; run that method's stages first")
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


def compare(pipeline, methods: list[str] | None = None, fraction: float | None = None,
            seeds: list[int] | None = None) -> pd.DataFrame:
    """Tidy results (method, fraction, seed, metric, loss, n_train, n_test); resumable, saved as
    ``evaluation/results.csv`` in the run directory."""
    ev = pipeline.cfg.evaluation
    methods = methods or list(ev.methods)
    if pipeline.cfg.data.label_free:
        methods = [m for m in methods if m != "less"]
    bad = set(methods) - set(EVAL_METHODS)
    if bad:
        raise ValueError(f"unknown evaluation method(s) {sorted(bad)}; choose from {EVAL_METHODS}")
    fraction = fraction or ev.fraction
    seeds = seeds if seeds is not None else list(ev.seeds)
    test = pipeline.target_test[: ev.max_test or None]
    folder = pipeline.run_dir / "evaluation"
    folder.mkdir(exist_ok=True)
    path = folder / "results.csv"
    rows = pd.read_csv(path).to_dict("records") if path.exists() else []
    base = {"model": pipeline.cfg.model, "eval": ev.__dict__, "metric": pipeline._metric_key(),
            "test": [r.id for r in test]}
    jobs = []
    for method in methods:
        for seed in seeds:
            ids = subset_ids(pipeline, method, fraction, seed)
            key = fingerprint({**base, "ids": ids, "seed": seed})
            jobs.append((method, seed, ids, key))
    done = {r["key"] for r in rows}
    for method, seed, ids, key in tqdm([j for j in jobs if j[3] not in done], desc="evaluate"):
        result = finetune_and_evaluate(pipeline, ids, seed, test)
        rows.append({"method": method, "fraction": 1.0 if method == "full" else fraction, "seed": seed,
                     **result, "n_train": len(ids), "key": key})
        pd.DataFrame(rows).to_csv(path, index=False)
    keys = {j[3] for j in jobs}
    df = pd.DataFrame([r for r in rows if r["key"] in keys])
    return df.drop(columns=["key"]).reset_index(drop=True)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard error of the metric (and loss) per method and fraction."""
    def sem(x):
        return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")

    agg = {"metric": ["mean", sem], "seed": "count"}
    if "loss" in results.columns:
        agg["loss"] = ["mean", sem]
    out = results.groupby(["method", "fraction"], sort=False).agg(agg)
    out.columns = ["_".join(c) if c[1] not in ("", "count") else c[0] + "s" for c in out.columns]
    return out.rename(columns={"seeds": "n_seeds", "metric_sem": "metric_se", "loss_sem": "loss_se"}).reset_index()


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
    key = fingerprint({"warmup": pipeline.warmup_key, "metric": pipeline._metric_key(),
                       "ids": [r.id for r in records], "max_new_tokens": pipeline.cfg.evaluation.max_new_tokens})
    if path.exists():
        df = pd.read_csv(path)
        if (df["key"] == key).all():
            return df.drop(columns=["key"])
    rows = []
    reset_lora(pipeline.model, pipeline.cfg.seed)
    rows.append({"epoch": 0, "lr": 0.0, **evaluate_model(pipeline, records)})
    for ckpt in pipeline.checkpoints:
        load_adapter_weights(pipeline.model, ckpt)
        rows.append({"epoch": ckpt.epoch, "lr": ckpt.lr, **evaluate_model(pipeline, records)})
    df = pd.DataFrame(rows)
    df.assign(key=key).to_csv(path, index=False)
    return df
