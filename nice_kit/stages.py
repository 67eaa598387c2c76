"""The stages of a run, as functions of the run (:class:`nice_kit.view.RunView`, which
:class:`nice_kit.pipeline.Pipeline` implements and whose verbs call these): each reads what it needs
through the run, records the inputs it was made from, resumes chunk by chunk, and is reused only when
those inputs are unchanged.

Every per-item stage (training and validation gradients, rollouts, and explain's and what-if's
per-completion vectors) runs through :func:`run_chunks`: compute the missing chunks of this process's
shard, skip sound ones, recompute damaged ones, and merge once every chunk exists.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics as metrics_mod
from .data import check_max_length, pool_size_warnings, save_records, tokenize_records
from .gradients import BatchSize, WeightedSequence, adam_precondition, gradient_dim, mean_nll_sequence, projected_gradients
from .influence import counted_prompts, influence_scores, top_fraction
from .measurements import Measurement
from .projection import Projector, ProjectionSpec, normalize_rows, save_spec
from .rollouts import sample_rollouts
from .settings import SELECTION_METHODS
from .runs import (IntegrityError, Stage, StaleResultError, atomic_write_text, check_file, describe_changes, fingerprint,
                   drop_if_damaged, file_record, open_stage, read_checked_json, read_rows, read_stage, rows_problem,
                   save_tensors, shard_chunks, tmp_path_for, write_checked_json, write_rows, writing)
from .vectors import StoredVectors, adopt_legacy, chunk_problem, chunk_tensors, merge_chunks, open_vectors
from .warmup import Checkpoint, checkpoint_records, checkpoint_weights, load_adapter_weights, load_checkpoints, reset_lora, train_lora

if TYPE_CHECKING:  # pragma: no cover
    from .view import RunView


class GradientProjection:
    """A run's projection of LoRA gradients, shared by its stages: the spec (D read from the warmup's
    Adam moments, so no model load), the projector on the model's device, and one batch size that an
    out-of-memory error lowers for the rest of the run (:class:`nice_kit.gradients.BatchSize`)."""

    def __init__(self, run: "RunView"):
        self.run = run

    @cached_property
    def gradient_dim(self) -> int:
        done = load_checkpoints(self.run.run_dir / "warmup")  # one Adam moment per LoRA parameter
        return done[0].moments()[0].numel() if done else gradient_dim(self.run.model)

    def spec(self, input_dim: int | None = None) -> ProjectionSpec:
        p = self.run.cfg.projection
        return ProjectionSpec(kind=p.kind, dim=p.dim, seed=p.seed, nnz=p.nnz,
                              input_dim=self.gradient_dim if input_dim is None else input_dim)

    @cached_property
    def projector(self) -> Projector:
        return Projector(self.spec(), device=self.run.device)

    @cached_property
    def batch(self) -> BatchSize:
        return BatchSize(self.run.cfg.gradients.batch_size)

    def project(self, seqs: list[WeightedSequence], n_groups: int, transform=None) -> dict[str, torch.Tensor]:
        """Projected gradients of ``n_groups`` groups of sequences, unit rows and their norms
        (:func:`nice_kit.gradients.projected_gradients`, ``gradients.batch_size`` groups at a time)."""
        out = projected_gradients(self.run.model, seqs, n_groups, self.run.tokenizer.pad_token_id,
                                  self.projector.project, transform, self.batch, log=lambda m: tqdm.write(f"[nice_kit] {m}"))
        return {"vectors": normalize_rows(out), "norms": out.norm(dim=1)}


def val_folder(m: Measurement, ckpt: Checkpoint) -> str:
    """Where a measurement's validation vectors of a checkpoint live, under ``grads/``."""
    return f"val_{m.name}/epoch_{ckpt.epoch}"


def prepare(run: "RunView") -> dict[str, Any]:
    """Check the data (every record, and what the metric needs of each target record) and tokenise
    it; report truncation; check ``max_length`` against the model's context and what a small pool
    does to the warmup and selection fractions (warned). Writes prepare/stats.json."""
    max_len = run.cfg.data.max_length
    warned = pool_size_warnings(len(run.pool), run.cfg.warmup.fraction, run.cfg.selection.fraction)
    pool_tok, pool_trunc = tokenize_records(run.tokenizer, run.pool, max_len)
    longest = max(len(t.input_ids) for t in pool_tok)
    if not run.cfg.data.label_free:
        longest = max(longest, *(len(t.input_ids) for t in tokenize_records(run.tokenizer, run.target_val,
                                                                              max_len)[0]))
    context_warning = check_max_length(max_len, run.model_context(), run.cfg.model, longest)
    for msg in warned + ([context_warning] if context_warning else []):
        run.log(f"warning: {msg}")
        warnings.warn(f"{run.cfg.data.pool}: {msg}", stacklevel=2)
    stats = {
        "pool_examples": len(run.pool), "pool_truncated": pool_trunc,
        "pool_mean_tokens": float(np.mean([len(t.input_ids) for t in pool_tok])),
        "target_val_prompts": len(run.target_val), "target_test_prompts": len(run.target_test),
        "label_free": run.cfg.data.label_free, "max_length": max_len,
    }
    if not run.cfg.data.label_free:
        _, stats["target_val_truncated"] = tokenize_records(run.tokenizer, run.target_val, max_len)
    if pool_trunc:
        run.log(f"{pool_trunc} of {len(run.pool)} pool examples were truncated to {max_len} tokens")
    (run.run_dir / "prepare").mkdir(exist_ok=True)
    atomic_write_text(run.run_dir / "prepare" / "stats.json", json.dumps(stats, indent=1))
    return stats


def warmup_ids(run: "RunView") -> list[str]:
    """The random fraction of the pool the warmup trains on."""
    rng = np.random.default_rng(run.cfg.seed)
    n = max(1, int(round(run.cfg.warmup.fraction * len(run.pool))))
    picked = sorted(rng.choice(len(run.pool), size=n, replace=False).tolist())
    return [run.pool[i].id for i in picked]


def warmup(run: "RunView") -> list[Checkpoint]:
    """Train the warmup LoRA; one checkpoint per epoch (resumes after the last finished epoch)."""
    with run.dist.main_first():  # rank 0 opens (or clears) the folder before the others look
        stage = open_stage(run.run_dir / "warmup", run.warmup_inputs())
    if stage.done:
        return load_checkpoints(stage.path)
    ids = set(warmup_ids(run))
    examples, _ = tokenize_records(run.tokenizer, [r for r in run.pool if r.id in ids], run.cfg.data.max_length)
    w = run.cfg.warmup
    run.log(f"step: warmup ({len(examples)} examples, {w.epochs} epochs)")
    if not load_checkpoints(stage.path):  # a fresh start: the adapter's initial weights come from the seed
        reset_lora(run.model, run.cfg.seed)
    ckpts = train_lora(run.model, examples, epochs=w.epochs, lr=w.lr, batch_size=w.batch_size,
                       pad_id=run.tokenizer.pad_token_id, seed=run.cfg.seed, grad_accum=w.grad_accum,
                       warmup_ratio=w.warmup_ratio, weight_decay=w.weight_decay, out_dir=stage.path,
                       desc="warmup", dist=run.dist)

    def finish() -> None:
        atomic_write_text(stage.path / "warmup_ids.json", json.dumps(sorted(ids)))
        stage.mark_done({**checkpoint_records(stage.path),
                         "warmup_ids.json": file_record(stage.path / "warmup_ids.json")})

    run.dist.on_main(finish)
    run.dist.wait_visible(stage.path / "DONE")
    return ckpts


@dataclass(frozen=True)
class ChunkFormat:
    """How a per-item stage stores its chunks: the file suffix, the writer of one chunk, the check of
    a chunk holding ``n`` items (``None``: sound), and the merge of every chunk into the stage's result."""

    suffix: str
    save: Callable[[Any, Path], None]
    problem: Callable[[Path, int], str | None]
    merge: Callable[[Stage, int, int], None]


# late-bound, so a test that stands in for one of these (a kill, a full disk) reaches every stage
VECTOR_CHUNKS = ChunkFormat(".safetensors", lambda got, path: save_tensors(got, path),
                            lambda path, n: chunk_problem(path, n), lambda stage, n, size: merge_chunks(stage, n, size))


def run_chunks(run: "RunView", stage: Stage, n_items: int, shard: tuple[int, int], compute: Callable[[int, int], Any],
               desc: str, fmt: ChunkFormat = VECTOR_CHUNKS) -> bool:
    """The one chunked-stage mechanism: compute the shard's missing chunks with ``compute(start, stop)``
    (a chunk is reused when sound, recomputed when damaged), then merge once every chunk exists.
    Returns whether the stage was merged (False: other hand-started shards, ``--shard``, are missing).

    Under torchrun the shard is split again by rank, and rank 0 merges once every rank is done."""
    size = stage.chunk_size(run.cfg.gradients.chunk_size)
    todo = [c for c in shard_chunks(n_items, size, run.dist.shard(shard))
            if not drop_if_damaged(stage.chunk_path(c[0], fmt.suffix), fmt.problem(stage.chunk_path(c[0], fmt.suffix),
                                                                                    c[2] - c[1]))]
    for c, start, stop in tqdm(todo, desc=desc, leave=False):
        fmt.save(compute(start, stop), stage.chunk_path(c, fmt.suffix))
    run.dist.barrier()  # every rank's chunks are on disk

    def merge() -> bool:
        if all(stage.chunk_path(c, fmt.suffix).exists() for c, _, _ in shard_chunks(n_items, size)):
            fmt.merge(stage, n_items, size)
            return True
        return False

    merged = run.dist.on_main(merge)
    if merged:
        run.dist.wait_visible(stage.path / "DONE")
    return merged


def checkpoint_origin(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The checkpoint's content as its stages record it (checksums from its state.json; None when the
    checkpoint predates them)."""
    files = ckpt.files or {}
    if not all(n in files for n in ("adapter/adapter_model.safetensors", "adam_moments.safetensors")):
        return None
    return {"checkpoint": f"epoch_{ckpt.epoch}", "adapter": files["adapter/adapter_model.safetensors"]["sha256"],
            "adam moments": files["adam_moments.safetensors"]["sha256"]}


def vector_stage(run: "RunView", folder: str, inputs: dict[str, Any], ids: list[str], ckpt: Checkpoint | None = None) -> Stage:
    with run.dist.main_first():  # rank 0 opens (or clears) the folder before the others look
        stage = open_stage(run.run_dir / "grads" / folder, inputs)
        if ckpt is not None:  # made from another checkpoint (recomputed with other bytes since): again
            stage.restart_if_made_from_other(checkpoint_origin(ckpt))
        adopt_legacy(stage)  # a finished stage made before checksums were kept: checked, then recorded
        if not (stage.path / "projection.json").exists():
            save_spec(run.projection_spec(), stage.path)
        if not (stage.path / "ids.json").exists():
            atomic_write_text(stage.path / "ids.json", json.dumps(ids))
    return stage


def train_gradients(run: "RunView", shard: tuple[int, int] = (0, 1)) -> None:
    """Projected, Adam-preconditioned gradients of every pool example at every checkpoint."""
    pool_tok = None
    for ckpt in run.checkpoints:
        stage = vector_stage(run, f"train/epoch_{ckpt.epoch}", run.train_inputs(ckpt), [r.id for r in run.pool],
                                   ckpt)
        if stage.done:
            continue
        run.log(f"step: training gradients, epoch {ckpt.epoch} ({len(run.pool)} examples)")
        if pool_tok is None:
            pool_tok, _ = tokenize_records(run.tokenizer, run.pool, run.cfg.data.max_length)
        load_adapter_weights(run.model, ckpt)
        exp_avg, exp_avg_sq = (t.to(run.device) for t in ckpt.moments())

        def compute(start, stop):
            seqs = [mean_nll_sequence(pool_tok[i], i - start) for i in range(start, stop)]
            got = run.project_gradients(seqs, stop - start,
                                  lambda g: adam_precondition(g, exp_avg, exp_avg_sq, inplace=True))
            return chunk_tensors(got["vectors"], got["norms"])

        run_chunks(run, stage, len(pool_tok), shard, compute, f"train grads epoch {ckpt.epoch}")


def rollouts(run: "RunView", ckpt: Checkpoint | None = None) -> pd.DataFrame:
    """Sampled completions of every target prompt with their rewards (sampled once, re-scored when
    the metric changes). With no checkpoint, all checkpoints' rollouts in one table."""
    if ckpt is None:
        return pd.concat([run.rollouts(c) for c in run.checkpoints], ignore_index=True)
    with run.dist.main_first():  # rank 0 opens (or clears) the folder before the others look
        stage = open_stage(run.run_dir / "rollouts" / f"epoch_{ckpt.epoch}", run.rollout_inputs(ckpt))
        stage.restart_if_made_from_other(checkpoint_origin(ckpt))
    samples_path = stage.path / "samples.jsonl"
    if not stage.done:
        k = run.cfg.rollouts.k
        run.log(f"step: rollouts, epoch {ckpt.epoch} ({len(run.target_val)} prompts x {k})")
        loaded = []

        def compute(start: int, stop: int) -> list[dict[str, Any]]:
            if not loaded:  # the adapter is loaded only when a chunk is sampled
                load_adapter_weights(run.model, ckpt)
                loaded.append(True)
            return sample_rollouts(run.model, run.tokenizer, run.target_val[start:stop], run.cfg.rollouts,
                                   seed=run.cfg.seed, epoch=ckpt.epoch)

        def concatenate(stage: Stage, n_items: int, size: int) -> None:
            rows = []
            for c, start, stop in shard_chunks(n_items, size):
                try:
                    rows += read_rows(stage.chunk_path(c, ".jsonl"), (stop - start) * k)
                except IntegrityError as err:  # damaged since it was written: recomputed by the next run
                    stage.chunk_path(c, ".jsonl").unlink(missing_ok=True)
                    raise IntegrityError(err.path, err.problem + " (removed: run the command again to "
                                         "recompute it)") from None
            atomic_write_text(samples_path, "\n".join(rows) + "\n")
            atomic_write_text(stage.path / "sampling.json", json.dumps(run.cfg.rollouts.__dict__, indent=1))
            stage.mark_done(["samples.jsonl", "sampling.json"])

        fmt = ChunkFormat(".jsonl", lambda rows, path: write_rows(path, rows), lambda path, n: rows_problem(path, n * k),
                          concatenate)
        if not run_chunks(run, stage, len(run.target_val), (0, 1), compute, f"rollouts epoch {ckpt.epoch}", fmt):
            raise RuntimeError(f"{stage.path}: rollout chunks are missing; run the command again")
        run.dist.wait_visible(samples_path)
    df = pd.read_json(samples_path, lines=True, dtype={"prompt_id": str, "eos_token_id": "Int64"})
    df.insert(0, "epoch", ckpt.epoch)
    df["reward"] = run.dist.on_main(lambda: stored_rewards(run, stage.path, df))  # rank 0 scores, all receive
    return df


def stored_rewards(run: "RunView", folder: Path, df: pd.DataFrame) -> list[float]:
    """The metric's rewards of the stage's samples, cached beside them with their checksum and the
    checksum of the samples they score (a cache that does not match is recomputed, with a log line)."""
    path = folder / f"rewards_{fingerprint(run.reward_inputs())}.json"
    samples_sha = file_record(folder / "samples.jsonl")["sha256"]
    if path.exists():
        try:
            rewards, about = read_checked_json(path)
            problem = None
            if not isinstance(rewards, list) or len(rewards) != len(df):
                problem = f"{len(rewards) if isinstance(rewards, list) else 'no'} rewards for {len(df)} samples"
            elif not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rewards):
                problem = "holds values that are not numbers"
            elif about.get("samples_sha256", samples_sha) != samples_sha:
                problem = "made for other samples than samples.jsonl holds now"
        except IntegrityError as err:
            problem = err.problem
        if problem is None:
            return rewards
        run.log(f"integrity: {path}: {problem} -- rescoring the samples")
    by_id = {r.id: r for r in run.target_val}
    recs = [by_id[i] for i in df["prompt_id"]]
    cols, passed, withheld = run.metric_columns(recs)
    if withheld:
        run.log(f"label-free: the metric receives columns {passed}; withheld: {withheld}")
    rewards = metrics_mod.score(run.metric(), [r.prompt for r in recs], df["completion"].tolist(), **cols)
    write_checked_json(path, rewards, samples_sha256=samples_sha, n=len(rewards))
    return rewards


def reference_rewards(run: "RunView") -> dict[str, float]:
    """The metric on each target prompt's reference answer (for the rejection variant)."""
    if run.cfg.data.label_free:
        return {}
    cols, _, _ = run.metric_columns(run.target_val)
    vals = metrics_mod.score(run.metric(), [r.prompt for r in run.target_val],
                             [r.response for r in run.target_val], **cols)
    return {r.id: v for r, v in zip(run.target_val, vals)}


def validation_gradients(run: "RunView", method: str | Measurement = "nice", shard: tuple[int, int] = (0, 1)) -> None:
    """Projected gradients of what ``method`` measures on each target prompt, per checkpoint:
    ``"less"`` (reference answers' mean NLL), ``"nice"`` (reward-weighted summed NLL of the
    model's own sampled completions) or any :class:`~nice_kit.measurements.Measurement`."""
    m = run.measurement(method)
    if m.needs_reference and run.cfg.data.label_free:
        raise ValueError(f"{m.name} needs reference answers (LESS needs reference answers); this run is label-free")
    val = run.target_val
    for ckpt in run.checkpoints:
        stage = vector_stage(run, val_folder(m, ckpt), run.val_inputs(m, ckpt), [r.id for r in val], ckpt)
        if stage.done:
            continue
        run.log(f"step: validation gradients ({m.name}), epoch {ckpt.epoch} ({len(val)} target prompts)")
        notes = m.prepare(run.context, ckpt)
        if notes is not None:
            atomic_write_text(stage.path / "notes.json", json.dumps(notes, indent=1))
        load_adapter_weights(run.model, ckpt)

        def compute(start, stop):
            measured = m.measure(run.context, ckpt, val[start:stop])
            got = run.project_gradients(measured.sequences, stop - start)
            valid = None if measured.valid is None else torch.tensor([float(v) for v in measured.valid])
            return chunk_tensors(got["vectors"], got["norms"], valid)

        run_chunks(run, stage, len(val), shard, compute, f"val grads ({m.name}) epoch {ckpt.epoch}")


def stored_vectors(run: "RunView", which: str | Measurement = "train") -> list[StoredVectors]:
    """The finished vectors of ``"train"`` or of a measurement, one per checkpoint (memory-mapped).

    Raises :class:`~nice_kit.runs.StaleResultError` when they were made from other settings."""
    out = []
    for ckpt in run.checkpoints:
        if which == "train":
            folder, inputs = f"train/epoch_{ckpt.epoch}", run.train_inputs(ckpt)
            what, fix = f"training gradients (epoch {ckpt.epoch})", "nice-kit train-grads (or run)"
        else:
            name = which.name if isinstance(which, Measurement) else str(which).removeprefix("val_")
            m = run.measurement(which if isinstance(which, Measurement) else name)
            folder, inputs = val_folder(m, ckpt), run.val_inputs(m, ckpt)
            what = f"{m.name} validation gradients (epoch {ckpt.epoch})"
            fix = (f"nice-kit val-grads --method {m.name} (or run)" if m.name in SELECTION_METHODS
                   else f"run.validation_gradients({m!r})")
        stage = read_stage(run.run_dir / "grads" / folder, inputs, what, fix)
        stage.check_made_from(checkpoint_origin(ckpt), what, fix)
        stored = open_vectors(stage.path)
        stored.spec.check_compatible(run.projection_spec(stored.spec.input_dim), what)
        out.append(stored)
    return out


def load_vectors(run: "RunView", which: str | Measurement) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[str]]:
    """Vectors of ``"train"`` or a measurement per checkpoint as float32 tensors, with the validity
    masks and the ids."""
    stored = stored_vectors(run, which)
    valid = [None if s.valid is None else torch.from_numpy(s.valid.astype(np.float32)) for s in stored]
    return [s.all() for s in stored], valid, stored[0].ids


def scores(run: "RunView", methods: list[str | Measurement] | None = None) -> pd.DataFrame:
    """Influence scores of every pool example, one column per method; written to scores.csv."""
    methods = methods or run.default_methods()
    train = run.stored_vectors("train")
    weights = checkpoint_weights(run.checkpoints)
    subtasks = run.target_subtasks()
    out = pd.DataFrame({"id": train[0].ids})
    for method in methods:
        m = run.measurement(method)
        val = run.stored_vectors(m)
        mask = None
        if val[0].valid is not None:  # a prompt counts if it has signal at any checkpoint
            mask = torch.from_numpy(counted_prompts([v.valid for v in val], len(subtasks)))
            if not mask.any():
                raise ValueError(
                    f"{m.name}: none of the {len(subtasks)} target prompts got a non-zero policy gradient "
                    "at any checkpoint. Try a partial-credit or lenient metric, a longer warmup, more "
                    "samples (rollouts.k), a higher temperature, or no baseline.")
        out[m.name] = influence_scores(train, [v.all() for v in val], weights, subtasks, mask,
                                       run.cfg.selection.aggregate)
    path = run.run_dir / "scores.csv"
    tmp = tmp_path_for(path)
    with writing(path, tmp):  # atomic; a full disk: DiskFullError, nothing half-written left
        out.to_csv(tmp, index=False)
        tmp.replace(path)
    atomic_write_text(run.run_dir / "scores.json",
                      json.dumps({"inputs": run.scores_inputs(methods), "methods": [run.measurement(x).name
                                                                                     for x in methods],
                                  "scores.csv": file_record(run.run_dir / "scores.csv")}, indent=1))
    return out


def read_scores(run: "RunView", measurements: list[Measurement] | None = None) -> pd.DataFrame:
    """``scores.csv`` as a DataFrame, after checking it was computed from the current config's
    vectors (raises :class:`~nice_kit.runs.StaleResultError` naming what changed). Scores of your
    own measurements are checked too: pass them (or use them in this pipeline first)."""
    for m in measurements or []:
        run.measurement(m)
    path = run.run_dir / "scores.csv"
    meta = run.run_dir / "scores.json"
    if not path.exists() or not meta.exists():
        raise RuntimeError(f"{path}: no influence scores yet; run `nice-kit score` (or `nice-kit run`)")
    try:
        stored = json.loads(meta.read_text())
    except ValueError:
        raise IntegrityError(meta, "not valid JSON: corrupted", "recompute: nice-kit score (or run)") from None
    if "scores.csv" in stored:  # recorded since nice_kit kept checksums
        problem = check_file(path, stored["scores.csv"])
        if problem:
            raise IntegrityError(path, problem, "recompute: nice-kit score (or run)")
    unknown = [m for m in stored["methods"] if not run.knows_measurement(m)]
    if unknown:
        raise ValueError(f"{path} holds scores of your own measurement(s) {unknown}: pass them, "
                         "read_scores(measurements=[...]), to check those scores are current")
    run.stored_vectors("train")
    for m in stored["methods"]:
        run.stored_vectors(m)  # names the stage and the setting when a vector stage is stale
    current = run.scores_inputs(stored["methods"])
    if stored["inputs"] != current:
        changes = describe_changes(stored["inputs"], current)
        raise StaleResultError(f"{path} was computed from other vectors or settings:\n  " + "\n  ".join(changes)
                               + "\nRecompute: nice-kit score (or run)")
    return pd.read_csv(path, dtype={"id": str})


def select(run: "RunView", scores: pd.DataFrame | None = None, fraction: float | None = None) -> dict[str, list[str]]:
    """Top ``fraction`` of the pool by each method's score; writes selected_<method>.jsonl and
    selected.jsonl (NICE's selection when present, else the first method's)."""
    scores = scores if scores is not None else run.read_scores()
    fraction = fraction or run.cfg.selection.fraction
    by_id = {r.id: r for r in run.pool}
    chosen = {}
    for m in [c for c in scores.columns if c != "id"]:
        ids = top_fraction(scores["id"].tolist(), scores[m].to_numpy(), fraction)
        save_records([by_id[i] for i in ids], run.run_dir / f"selected_{m}.jsonl")
        chosen[m] = ids
    primary = "nice" if "nice" in chosen else next(iter(chosen))
    save_records([by_id[i] for i in chosen[primary]], run.run_dir / "selected.jsonl")
    return chosen
