"""What if: NICE's scores and selection under another metric, estimator or aggregate, from stored vectors.

A random projection is linear, so a target prompt's NICE vector is
P(sum_k a_k g_k) = sum_k a_k P(g_k): with the projected gradient of every sampled completion stored
once (:func:`completion_parts`), any policy weights a_k give the prompt vectors by a small matrix
product, and the scores follow from the stored training vectors. No model is loaded once the parts
are stored; a new metric runs on the stored completions (its rewards cached beside them, as the
rollouts stage caches them).

The parts of each checkpoint, one stored projected gradient each (``grads/nice_parts/epoch_C``):

* ``body``: a completion's sampled ids (no end-of-sequence token), NLL summed over them;
* ``eos``: the sampled end-of-sequence token alone (nice_kit's ``policy.include_eos``);
* ``reencoded``: the completion's text encoded again, where that gives other ids than were sampled
  (the reference estimator's sequence; otherwise it equals ``body``);
* ``reference``: the target prompt's reference answer, summed NLL (rejection fallbacks).

So nice_kit's estimator of a completion is ``body + eos`` (``eos`` where sampled and included), the
reference's ``reencoded`` (or ``body``), each times its policy weight (over its token count when
normalised). What a what-if cannot answer without new samples or gradients: anything that changes
the sampled completions (``rollouts.*``), the warmup, the training gradients or the projection, or
``data.max_length`` (which cuts a completion's tokens); those are refused with the settings named.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from . import stages
from .data import prompt_ids, tokenize_pair
from .explain import stored_parts
from .gradients import WeightedSequence
from .influence import counted_prompts, influence_scores, top_fraction
from .measurements import uses_reference_reward, weigh_rollouts
from .projection import normalize_rows
from .runs import read_stage
from .vectors import StoredVectors, chunk_tensors
from .warmup import checkpoint_weights, load_adapter_weights

if TYPE_CHECKING:  # pragma: no cover
    from .view import RunView
    from .warmup import Checkpoint

PARTS_VERSION = "unweighted parts: body, eos, reencoded, reference (1)"
# settings a what-if answers from stored vectors; every other setting needs new samples or gradients
WHAT_IF_SECTIONS = ("metric", "policy")
WHAT_IF_SETTINGS = ("selection.aggregate", "selection.fraction")


class NeedsRecompute(ValueError):
    """A what-if asked for a setting that changes the sampled completions or the gradients."""


# ------------------------------------------------------------------------------------ the parts
def _parts_folder(ckpt: "Checkpoint") -> str:
    return f"nice_parts/epoch_{ckpt.epoch}"


def parts_inputs(run: "RunView", ckpt: "Checkpoint") -> dict[str, Any]:
    """What the parts depend on: the samples, the warmup, the projection, the target file and the
    token limit. Not the metric and not the policy: that is what a what-if changes."""
    return {**run.train_inputs(ckpt), "rollouts": run.rollout_inputs(ckpt), "data.target_val": run.target_digest,
            "data.label_free": run.cfg.data.label_free, "data.max_length": run.cfg.data.max_length,
            "parts": PARTS_VERSION}


def _samples(run: "RunView", ckpt: "Checkpoint") -> pd.DataFrame:
    """The checkpoint's stored samples (no rewards), after checking they are current."""
    stage = read_stage(run.run_dir / "rollouts" / f"epoch_{ckpt.epoch}", run.rollout_inputs(ckpt),
                       f"the rollouts (epoch {ckpt.epoch})", "nice-kit rollouts (or run)")
    df = pd.read_json(stage.path / "samples.jsonl", lines=True, dtype={"prompt_id": str, "eos_token_id": "Int64"})
    df.insert(0, "epoch", ckpt.epoch)
    return df


def parts_table(run: "RunView", ckpt: "Checkpoint", samples: pd.DataFrame | None = None
                ) -> tuple[pd.DataFrame, list[WeightedSequence]]:
    """The checkpoint's parts (one row each: ``part_id``, ``prompt_id``, ``sample``, ``kind``,
    ``n_tokens``) and the sequence whose summed-NLL gradient each stores (``group`` = row)."""
    samples = _samples(run, ckpt) if samples is None else samples
    tok, max_len = run.tokenizer, run.cfg.data.max_length
    rows, seqs = [], []

    def add(pid: str, sample: int, kind: str, ids: list[int], weights: list[float], n: int) -> None:
        if n:
            seqs.append(WeightedSequence(ids, weights, len(rows)))
        rows.append({"part_id": f"{pid}/{sample}/{kind}" if sample >= 0 else f"{pid}/{kind}", "prompt_id": pid,
                     "sample": sample, "kind": kind, "n_tokens": n})

    by_prompt = {pid: g for pid, g in samples.groupby("prompt_id", sort=False)}
    for rec in run.target_val:
        p_ids = prompt_ids(tok, rec.messages)
        limit = max(1, max_len - len(p_ids))
        for r in by_prompt.get(rec.id, pd.DataFrame()).itertuples():
            toks = list(r.token_ids)[:limit]
            add(rec.id, int(r.sample), "body", p_ids + toks, [0.0] * len(p_ids) + [1.0] * len(toks), len(toks))
            eos = r.eos_token_id if not pd.isna(r.eos_token_id) else tok.eos_token_id
            if bool(r.ended_with_eos) and eos is not None and len(r.token_ids) < limit:
                add(rec.id, int(r.sample), "eos", p_ids + list(r.token_ids) + [int(eos)],
                    [0.0] * (len(p_ids) + len(r.token_ids)) + [1.0], 1)
            text = str(r.completion)
            enc = list(tok.encode(text, add_special_tokens=False))[:limit] if text else []
            if enc != toks:
                add(rec.id, int(r.sample), "reencoded", p_ids + enc, [0.0] * len(p_ids) + [1.0] * len(enc), len(enc))
        if rec.response is not None:
            ref = tokenize_pair(tok, rec.messages, rec.response, max_len)
            add(rec.id, -1, "reference", ref.input_ids, [0.0 if x < 0 else 1.0 for x in ref.labels],
                ref.n_response_tokens)
    return pd.DataFrame(rows), seqs


def completion_parts(run: "RunView", compute: bool = True) -> list[tuple[pd.DataFrame, StoredVectors]]:
    """Per checkpoint: the parts table and the stored projected gradient of every part (unit rows and
    their ``norms``). Computed on first use (``compute=True``: loads the model, resumable chunk by
    chunk, shard- and chunk-size-independent) and read back afterwards, checked like every stage."""
    out = []
    for ckpt in run.checkpoints:
        folder, inputs = _parts_folder(ckpt), parts_inputs(run, ckpt)
        path = run.run_dir / "grads" / folder
        what = f"NICE per-completion gradients for what-ifs (epoch {ckpt.epoch})"
        fix = "run.what_if(...) or nice-kit what-if (computes them)"
        table, seqs = parts_table(run, ckpt)
        stored = stored_parts(run, ckpt, path, inputs, table["part_id"].tolist(), what, fix,
                              (lambda: _compute_parts(run, ckpt, table, seqs, folder, inputs)) if compute else None)
        out.append((table, stored))
    return out


def _compute_parts(run: "RunView", ckpt: "Checkpoint", table: pd.DataFrame, seqs: list[WeightedSequence],
                   folder: str, inputs: dict[str, Any]) -> None:
    stage = stages.vector_stage(run, folder, inputs, table["part_id"].tolist(), ckpt)
    if stage.done:
        return
    run.log(f"step: per-completion gradients for what-ifs, epoch {ckpt.epoch} ({len(table)} parts)")
    by_row: dict[int, WeightedSequence] = {q.group: q for q in seqs}
    loaded = []

    def compute(start: int, stop: int):
        if not loaded:  # only when a chunk is missing: a finished stage never loads the model
            load_adapter_weights(run.model, ckpt)
            loaded.append(True)
        block = [WeightedSequence(by_row[i].input_ids, by_row[i].weights, i - start)
                 for i in range(start, stop) if i in by_row]
        got = run.project_gradients(block, stop - start)  # parts without a token stay zero rows
        return chunk_tensors(got["vectors"], got["norms"])

    stages.run_chunks(run, stage, len(table), (0, 1), compute, f"what-if parts epoch {ckpt.epoch}")


# ----------------------------------------------------------------------------- prompt vectors
def prompt_coefficients(run_cfg, table: pd.DataFrame, weighted: pd.DataFrame, per_prompt: dict,
                        prompt_order: list[str]) -> tuple[np.ndarray, list[bool]]:
    """(prompts x parts) coefficients c such that prompt j's gradient is sum_p c[j, p] g_p, under the
    config's estimator, from the rollouts' policy ``weight`` column; and each prompt's validity."""
    pol = run_cfg.policy
    reference = pol.estimator == "reference"
    index = {pid: i for i, pid in enumerate(table["part_id"])}
    n_tok = table["n_tokens"].to_numpy()
    row_of = {pid: j for j, pid in enumerate(prompt_order)}
    coef = np.zeros((len(prompt_order), len(table)))
    for r in weighted.itertuples():
        a = float(r.weight)
        if a == 0:
            continue
        j, base = row_of[r.prompt_id], f"{r.prompt_id}/{int(r.sample)}"
        if reference:
            part = index.get(f"{base}/reencoded", index[f"{base}/body"])
            n = n_tok[part]
            if n:
                coef[j, part] += a / n if pol.do_normalize else a
            continue
        body, eos = index[f"{base}/body"], index.get(f"{base}/eos")
        with_eos = eos is not None and pol.include_eos
        n = n_tok[body] + (1 if with_eos else 0)
        if not n:
            continue
        f = a / n if pol.token_normalize else a
        coef[j, body] += f
        if with_eos:
            coef[j, eos] += f
    valid = []
    for pid in prompt_order:
        pw = per_prompt.get(pid)
        valid.append(True if reference else bool(pw is not None and pw.signal))
        if pw is not None and pw.reference:
            part = index[f"{pid}/reference"]
            scale = 1.0 / max(n_tok[part], 1) if (reference and pol.do_normalize) else 1.0
            coef[row_of[pid], part] += pw.reference * scale
    return coef, valid


def _raw_rows(stored: StoredVectors) -> torch.Tensor:
    """The stored parts as projected gradients (unit rows times their norms), float32."""
    return stored.all() * torch.from_numpy(stored.norms.astype(np.float32))[:, None]


# ------------------------------------------------------------------------------------- what_if
@dataclass
class WhatIf:
    """A what-if's answer. ``scores``: every pool example's current NICE score, the what-if's, both
    ranks and the rank move (positive: up); ``selected`` the what-if's top fraction, ``current`` the
    run's; ``moves`` the largest rank moves; ``diagnostics`` the benchmark's flags of both selections
    (None for a pool without them); ``signal`` the target prompts with signal per checkpoint."""

    changes: dict[str, Any]
    scores: pd.DataFrame
    selected: list[str]
    current: list[str]
    moves: pd.DataFrame
    diagnostics: pd.DataFrame | None
    signal: dict[int, int]
    seconds: float
    config: Any = field(repr=False, default=None)

    @property
    def overlap(self) -> int:
        return len(set(self.selected) & set(self.current))

    def summary(self) -> str:
        k = len(self.selected)
        lines = [f"what if {self.changes}: top {k} shares {self.overlap} of {k} with the run's selection "
                 f"({self.seconds:.2f} s); prompts with signal per checkpoint {self.signal}"]
        if self.diagnostics is not None:
            lines.append(self.diagnostics.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        lines.append("largest rank moves:")
        lines.append(self.moves.to_string(index=False, float_format=lambda x: f"{x:+.4f}"))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def what_if_config(run: "RunView", changes: dict[str, Any]):
    """The run's config with ``changes`` (``{"policy.baseline": "none", "metric.name": "length",
    "metric.params": {...}}``; a callable for ``metric.name`` is a user metric) applied and
    validated; :class:`NeedsRecompute` for a change that a what-if cannot answer from stored vectors."""
    import copy
    import dataclasses

    from .config import validate_config

    bad = sorted(k for k in changes if k.split(".")[0] not in WHAT_IF_SECTIONS and k not in WHAT_IF_SETTINGS)
    if bad:
        raise NeedsRecompute(
            f"{', '.join(bad)} change{'s' if len(bad) == 1 else ''} the sampled completions or the gradients: a "
            "what-if answers only [metric], [policy], selection.aggregate and selection.fraction from stored "
            "vectors. Compute the new stages with the setting in a config of their own: nice-kit run --config ... "
            "--run-dir ... (another run directory keeps this one's results)")
    cfg = copy.deepcopy(run.cfg)
    if "metric.name" in changes and "metric.params" not in changes:
        cfg.metric.params = {}  # a new metric starts from its own defaults
    for key, value in changes.items():
        section, _, name = key.partition(".")
        target = getattr(cfg, section)
        if name.startswith("params.") and section == "metric":
            cfg.metric.params = {**cfg.metric.params, name[len("params."):]: value}
            continue
        if name not in {f.name for f in dataclasses.fields(target)}:
            known = ", ".join(f"{section}.{f.name}" for f in dataclasses.fields(target))
            raise ValueError(f"what-if: no setting {key!r} (the [{section}] settings: {known})")
        setattr(target, name, value)
    validate_config(cfg, where="what-if", check_model=False)
    return cfg


def what_if(run: "RunView", changes: dict[str, Any] | None = None, *, checkpoint_weights_: list[float] | None = None,
            compute: bool = True, top_moves: int = 10, **policy: Any) -> WhatIf:
    """NICE's scores and top fraction if the config had ``changes`` (dotted settings, e.g.
    ``{"metric.name": "length", "metric.params": {"max_words": 3}}``; keyword arguments are policy
    settings: ``baseline="none"``, ``estimator="reference"``), and ``checkpoint_weights_`` (one per
    checkpoint, normalised) instead of the learning-rate weights. Reads the stored training vectors
    and per-completion parts (computing the parts once when ``compute``); the model is not loaded
    once they are stored. See the module docstring for what it cannot answer."""
    t0 = time.perf_counter()
    changes = {**(changes or {}), **{f"policy.{k}": v for k, v in policy.items()}}
    cfg = what_if_config(run, changes)
    q = run.with_config(cfg)
    ckpts = run.checkpoints
    parts = completion_parts(run, compute=compute)
    train = run.stored_vectors("train")
    order = [r.id for r in run.target_val]
    refs = q.reference_rewards() if uses_reference_reward(cfg.policy) else {}
    vectors, valid, signal = [], [], {}
    for ckpt, (table, stored) in zip(ckpts, parts):
        samples = _samples(run, ckpt)
        samples["reward"] = stages.stored_rewards(q, run.run_dir / "rollouts" / f"epoch_{ckpt.epoch}", samples)
        weighted, per_prompt = weigh_rollouts(samples, cfg.policy, refs)
        coef, ok = prompt_coefficients(cfg, table, weighted, per_prompt, order)
        vectors.append(normalize_rows(torch.from_numpy(coef.astype(np.float32)) @ _raw_rows(stored)))
        valid.append(np.array(ok))
        signal[ckpt.epoch] = int(sum(ok) if cfg.policy.estimator != "reference" else
                                 sum(per_prompt[p].signal for p in order if p in per_prompt))
    mask = counted_prompts(valid, len(order))
    if not mask.any():
        raise ValueError(f"what if {changes}: none of the {len(order)} target prompts carries a signal at any "
                         "checkpoint (every policy weight is zero)")
    weights = checkpoint_weights(ckpts) if checkpoint_weights_ is None else _normalised(checkpoint_weights_, ckpts)
    new = influence_scores(train, vectors, weights, run.target_subtasks(), torch.from_numpy(mask), cfg.selection.aggregate,
                           by_subtask_means=True)
    ids = train[0].ids
    current = run.read_scores()
    cur = current.set_index("id")["nice"].reindex(ids).to_numpy() if "nice" in current else np.full(len(ids), np.nan)
    table = pd.DataFrame({"id": ids, "current": cur, "what_if": new.astype(np.float64)})
    table["rank_current"] = table["current"].rank(ascending=False, method="first").astype("Int64")
    table["rank_what_if"] = table["what_if"].rank(ascending=False, method="first").astype(int)
    table["rank_move"] = table["rank_current"] - table["rank_what_if"]
    fraction = cfg.selection.fraction
    selected = top_fraction(ids, new, fraction)
    now = top_fraction(ids, cur, fraction) if not np.isnan(cur).any() else []
    moves = table.reindex(table["rank_move"].abs().sort_values(ascending=False, kind="mergesort").index)
    diag = None
    from .diagnostics import has_flags, selection_diagnostics

    if has_flags(run):
        diag = selection_diagnostics(run, {"nice": now, "what-if": selected}, write=False)
    return WhatIf(changes, table, selected, now, moves.head(top_moves).reset_index(drop=True), diag, signal,
                  time.perf_counter() - t0, cfg)


def _normalised(weights: list[float], ckpts: list) -> list[float]:
    if len(weights) != len(ckpts) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"checkpoint weights need {len(ckpts)} non-negative numbers with a positive sum, "
                         f"got {weights}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]
