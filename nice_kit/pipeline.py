"""The NICE / LESS pipeline over a run directory: a few verbs, each a cached, resumable stage.

    run = Pipeline(RunConfig.from_file("configs/default.toml"), "runs/default")
    run.warmup()                       # LoRA warmup checkpoints
    run.train_gradients()              # Adam-preconditioned, projected pool gradients per checkpoint
    run.validation_gradients("less")   # what LESS measures: reference answers' NLL
    run.validation_gradients("nice")   # what NICE measures: reward-weighted NLL of sampled completions
    scores = run.scores()              # DataFrame: id, less, nice  (also scores.csv)
    run.select()                       # selected.jsonl (+ selected_<method>.jsonl)

The pipeline never tests a method's name: what is measured on the target prompts is a
:class:`~nice_kit.measurements.Measurement` (``"less"`` and ``"nice"`` name the built-in ones; pass
your own instance anywhere a method goes).

Every stage's folder records the inputs it was made from (:mod:`nice_kit.runs`). A stage is reused
only when they are unchanged; every reader (``scores``, ``select``, ``evaluate``, the widgets)
checks them against the current config and refuses stale results, naming the stage and the
setting that changed. The pool's warmup and gradients do not depend on the target task: a new
target reuses them.

Run directory layout::

    config.json  prepare/  warmup/epoch_C/  grads/{train,val_<method>}/epoch_C/{vectors.npy, ...}
    rollouts/epoch_C/  scores.csv  scores.json  selected*.jsonl  diagnostics.csv  evaluation/
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics as metrics_mod
from .config import ConfigError, RunConfig, validate_config
from .data import (Record, check_max_length, collate, file_digest, load_records, model_context, pool_size_warnings,
                   save_records, tokenize_records)
from .distributed import SINGLE, Dist, on_rank_zero
from .gradients import (BatchSize, WeightedSequence, adam_precondition, gradient_dim, mean_nll_sequence,
                        projected_gradients)
from .influence import counted_prompts, influence_scores, top_fraction
from .measurements import MeasureContext, Measurement, PolicyGradient, as_measurement
from .metrics.records import check_targets, metric_columns
from .models import add_lora, load_model, load_tokenizer, set_threads
from .projection import Projector, ProjectionSpec, normalize_rows, save_spec
from .rollouts import SAMPLER, sample_rollouts
from .runs import (IntegrityError, Stage, StaleResultError, atomic_write_text, check_file, drop_if_damaged,
                   file_record, fingerprint, load_tensors, open_stage, read_checked_json, read_rows, read_stage,
                   rows_problem, save_tensors, shard_chunks, tmp_path_for, write_checked_json, write_rows,
                   writing)
from .vectors import StoredVectors, adopt_legacy, chunk_problem, chunk_tensors, merge_chunks, open_vectors
from .warmup import (Checkpoint, checkpoint_records, checkpoint_weights, load_adapter_weights, load_checkpoints,
                     reset_lora, train_lora)

# rollout settings that change how fast sampling runs, never what is sampled
_ROLLOUT_SPEED_SETTINGS = ("batch_size", "max_batch_tokens")


def _callable_key(fn: Callable) -> str:
    """A stable identity for a user's metric function: its code and what it captured.

    Two closures of one factory with different captured values (or defaults) get different keys.
    A callable may define ``cache_key`` (a string) to name itself."""
    import inspect

    explicit = getattr(fn, "cache_key", None)
    if isinstance(explicit, str):
        return explicit
    parts = [f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"]
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn)
    try:
        parts.append(inspect.getsource(target))
    except (OSError, TypeError):
        parts.append(repr(getattr(fn, "__code__", "")))
    func = getattr(fn, "__func__", fn)
    for cell in getattr(func, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            value = None
        parts.append(_callable_key(value) if callable(value) else repr(value))
    parts.append(repr(getattr(func, "__defaults__", None)))
    parts.append(repr(getattr(func, "__kwdefaults__", None)))
    if not inspect.isfunction(fn) and not inspect.ismethod(fn):
        parts.append(repr(sorted((k, repr(v)) for k, v in vars(fn).items())) if hasattr(fn, "__dict__") else "")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _records_digest(records: list[Record], with_response: bool = True) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.id, r.messages, r.response if with_response else None], sort_keys=True).encode())
    return h.hexdigest()[:16]


class Pipeline:
    """One run of the pipeline: a config and the run directory its stages write to."""

    def __init__(self, config: RunConfig, run_dir: str | Path, model=None, tokenizer=None, verbose: bool = True,
                 dist: Dist | None = None, write_config: bool = True):
        # a config edited in Python is checked too; the model itself is checked when it is loaded, so a
        # finished run made elsewhere opens without it
        validate_config(config, check_model=False)
        self.cfg = config
        self.dist = dist or SINGLE  # the processes sharing this run (nice_kit.distributed); one by default
        self.run_dir = Path(run_dir)
        if write_config:  # a view (Pipeline.open, what-ifs) makes no folder either: its stages make their own
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.verbose = verbose
        self._base_model, self._tokenizer = model, tokenizer
        self._peft = None
        self._measurements: dict[str, Measurement] = {}
        if write_config:  # False: a view of the run under other settings (what-ifs) leaves its config alone
            atomic_write_text(self.run_dir / "config.json", json.dumps(config.to_dict(), indent=1, default=str))

    def sibling(self, run_dir: str | Path, config: RunConfig) -> "Pipeline":
        """Another run with ``config`` in ``run_dir`` sharing this one's model and tokenizer (same base
        model and LoRA shape; each stage sets the adapter weights it needs)."""
        peft = self.model  # loaded now so that both share one LoRA-wrapped model
        other = Pipeline(config, run_dir, model=self._base_model, tokenizer=self.tokenizer, verbose=self.verbose,
                         dist=self.dist)
        other._peft = peft
        return other

    @classmethod
    def open(cls, run_dir: str | Path, verbose: bool = False) -> "Pipeline":
        """A finished run for viewing, from its ``config.json``: reading it writes nothing (its config
        is not rewritten, no folder is made) and every reader checks what it reads is current. The
        model is loaded only if something must be computed, so a run made elsewhere opens without it.
        Data paths that do not exist from here are looked for beside the run (``run_dir/data/<name>``)."""
        run_dir = Path(run_dir)
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{run_dir}: not a run directory (no config.json)")
        try:
            cfg = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError([f"{config_path}: not a readable run config ({err})"]) from None
        data = dict(cfg.get("data", {})) if isinstance(cfg, dict) else {}
        for key in ("pool", "target_val", "target_test"):
            value = data.get(key)
            if not isinstance(value, str) or not value or Path(value).exists():
                continue
            for candidate in (run_dir / "data" / Path(value).name, run_dir.parent / value):
                if candidate.exists():
                    data[key] = str(candidate.resolve())
                    break
        config = RunConfig.from_dict({**cfg, "data": data} if data else cfg, where=str(config_path), check_model=False)
        return cls(config, run_dir, verbose=verbose, write_config=False)

    def with_config(self, config: RunConfig, write_config: bool = False) -> "Pipeline":
        """This run directory under another ``config``, sharing whatever model, tokenizer and LoRA
        wrapper this pipeline has loaded (nothing is loaded now). ``write_config=False`` (a view, as a
        what-if takes) leaves the run's ``config.json`` as it is."""
        other = Pipeline(config, self.run_dir, model=self._base_model, tokenizer=self._tokenizer,
                         verbose=self.verbose, dist=self.dist, write_config=write_config)
        other._peft = self._peft
        return other

    @cached_property
    def context(self) -> MeasureContext:
        """What measurements receive of this run (:class:`nice_kit.measurements.MeasureContext`)."""
        return MeasureContext(self)

    @property
    def holds_model(self) -> bool:
        """Whether this pipeline was given (or has loaded) a model: new gradients need no model load."""
        return self._base_model is not None or self._peft is not None

    def log(self, msg: str) -> None:
        if self.verbose:
            tqdm.write(f"[nice_kit] {msg}")

    # -------------------------------------------------------------------------------------- inputs
    @cached_property
    def pool(self) -> list[Record]:
        return load_records(self.cfg.data.pool, require_response=True, columns=self.cfg.data.columns)

    @cached_property
    def target_val(self) -> list[Record]:
        return self._target(self.cfg.data.target_val)

    @cached_property
    def target_test(self) -> list[Record]:
        return self._target(self.cfg.data.target_test)

    def _target(self, path: str) -> list[Record]:
        records = load_records(path, require_response=not self.cfg.data.label_free, columns=self.cfg.data.columns)
        if self.cfg.data.label_free:  # label-free: no reference answer is read anywhere
            for r in records:
                r.response = None
        check_targets(records, self.cfg, path)  # what the metric needs of each record, before any stage
        return records

    @property
    def tokenizer(self):
        """The tokenizer (loaded on its own: stages that only read the run never load the model)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.model)
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer

    @property
    def model(self):
        """The base model wrapped in a LoRA adapter (weights set per checkpoint by the stages)."""
        if self._base_model is None:
            self.log(f"loading model {self.cfg.model}")
            self._base_model, tok = load_model(self.cfg.model, device=self.dist.device(self.cfg.device))
            self._tokenizer = self._tokenizer or tok
        if self._peft is None:
            self._peft = add_lora(self._base_model, self.cfg.lora, seed=self.cfg.seed)
            self._choose_threads()
        return self._peft

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _choose_threads(self) -> None:
        """Torch's thread count: the configured number, or ``"auto"``: measured once per process (at
        the first stage that loads the model) by timing a forward+backward at 1 and at all cores."""
        threads = self.dist.cpu_threads(self.cfg.threads)  # under torchrun: cores shared by the processes
        if threads != "auto":
            set_threads(threads)
            return
        sample, _ = tokenize_records(self.tokenizer, self.pool[:4], self.cfg.data.max_length)
        batch = collate(sample, self.tokenizer.pad_token_id)
        n = set_threads("auto", self._peft, {k: v.to(next(self._peft.parameters()).device) for k, v in batch.items()})
        self.log(f"torch threads: {n} (measured once for this process; set threads = N to fix it)")

    # ------------------------------------------------------------------------------ what stages depend on
    @cached_property
    def pool_digest(self) -> str:
        return file_digest(self.cfg.data.pool)

    @cached_property
    def target_digest(self) -> str:
        return file_digest(self.cfg.data.target_val)

    def warmup_inputs(self) -> dict[str, Any]:
        """What the warmup depends on: the pool, the model, LoRA and warmup settings and the seed.
        Not the target task: a new target reuses the warmup and the training gradients."""
        c = self.cfg
        return {"model": c.model, "data.pool": self.pool_digest, "data.columns": c.data.columns,
                "data.max_length": c.data.max_length, "lora": c.lora.__dict__, "warmup": c.warmup.__dict__,
                "seed": c.seed}

    def train_inputs(self, ckpt: Checkpoint) -> dict[str, Any]:
        return {**self.warmup_inputs(), "epoch": ckpt.epoch, "projection": self.projection_spec().to_dict()}

    def rollout_inputs(self, ckpt: Checkpoint) -> dict[str, Any]:
        """What the sampled completions depend on (not the metric: rewards are kept beside them)."""
        settings = {k: v for k, v in self.cfg.rollouts.__dict__.items() if k not in _ROLLOUT_SPEED_SETTINGS}
        return {**self.warmup_inputs(), "epoch": ckpt.epoch, "rollouts": settings, "sampler": SAMPLER,
                "data.target_val prompts": _records_digest(self.target_val, with_response=False)}

    def metric_key(self) -> dict[str, Any]:
        """What identifies the metric's rewards: its name and parameters, or a user function's code and
        captured values."""
        name = self.cfg.metric.name
        if callable(name):
            name = "callable:" + _callable_key(name)
        return {"name": name, "params": self.cfg.metric.params}

    def reward_inputs(self) -> dict[str, Any]:
        """What the rewards of given completions depend on: the metric and the columns it receives."""
        cols, passed, _ = self.metric_columns(self.target_val)
        digest = hashlib.sha256(json.dumps({k: cols[k] for k in passed}, sort_keys=True, default=str).encode())
        return {"metric": self.metric_key(), "columns": passed, "columns digest": digest.hexdigest()[:16]}

    def val_inputs(self, measurement: Measurement, ckpt: Checkpoint) -> dict[str, Any]:
        return {**self.train_inputs(ckpt), "data.target_val": self.target_digest,
                "data.label_free": self.cfg.data.label_free, "measurement": measurement.name,
                **measurement.key(self.context, ckpt)}

    # -------------------------------------------------------------------------------------- stages
    @on_rank_zero
    def prepare(self) -> dict[str, Any]:
        """Check the data (every record, and what the metric needs of each target record) and tokenise
        it; report truncation; check ``max_length`` against the model's context and what a small pool
        does to the warmup and selection fractions (warned). Writes prepare/stats.json."""
        import warnings

        max_len = self.cfg.data.max_length
        warned = pool_size_warnings(len(self.pool), self.cfg.warmup.fraction, self.cfg.selection.fraction)
        pool_tok, pool_trunc = tokenize_records(self.tokenizer, self.pool, max_len)
        longest = max(len(t.input_ids) for t in pool_tok)
        if not self.cfg.data.label_free:
            longest = max(longest, *(len(t.input_ids) for t in tokenize_records(self.tokenizer, self.target_val,
                                                                                  max_len)[0]))
        context_warning = check_max_length(max_len, self._model_context(), self.cfg.model, longest)
        for msg in warned + ([context_warning] if context_warning else []):
            self.log(f"warning: {msg}")
            warnings.warn(f"{self.cfg.data.pool}: {msg}", stacklevel=2)
        stats = {
            "pool_examples": len(self.pool), "pool_truncated": pool_trunc,
            "pool_mean_tokens": float(np.mean([len(t.input_ids) for t in pool_tok])),
            "target_val_prompts": len(self.target_val), "target_test_prompts": len(self.target_test),
            "label_free": self.cfg.data.label_free, "max_length": max_len,
        }
        if not self.cfg.data.label_free:
            _, stats["target_val_truncated"] = tokenize_records(self.tokenizer, self.target_val, max_len)
        if pool_trunc:
            self.log(f"{pool_trunc} of {len(self.pool)} pool examples were truncated to {max_len} tokens")
        (self.run_dir / "prepare").mkdir(exist_ok=True)
        atomic_write_text(self.run_dir / "prepare" / "stats.json", json.dumps(stats, indent=1))
        return stats

    def _model_context(self) -> int | None:
        """The model's context length from its config (the loaded model's, else config.json's: no weights read)."""
        if self._base_model is not None:
            return model_context(self._base_model.config)
        try:
            from .models import resolve_model_path

            return model_context(json.loads((Path(resolve_model_path(self.cfg.model)) / "config.json").read_text()))
        except (OSError, ValueError, RuntimeError):
            return None

    def warmup_ids(self) -> list[str]:
        """The random fraction of the pool the warmup trains on."""
        rng = np.random.default_rng(self.cfg.seed)
        n = max(1, int(round(self.cfg.warmup.fraction * len(self.pool))))
        picked = sorted(rng.choice(len(self.pool), size=n, replace=False).tolist())
        return [self.pool[i].id for i in picked]

    def warmup(self) -> list[Checkpoint]:
        """Train the warmup LoRA; one checkpoint per epoch (resumes after the last finished epoch)."""
        with self.dist.main_first():  # rank 0 opens (or clears) the folder before the others look
            stage = open_stage(self.run_dir / "warmup", self.warmup_inputs())
        if stage.done:
            return load_checkpoints(stage.path)
        ids = set(self.warmup_ids())
        examples, _ = tokenize_records(self.tokenizer, [r for r in self.pool if r.id in ids], self.cfg.data.max_length)
        w = self.cfg.warmup
        self.log(f"step: warmup ({len(examples)} examples, {w.epochs} epochs)")
        if not load_checkpoints(stage.path):  # a fresh start: the adapter's initial weights come from the seed
            reset_lora(self.model, self.cfg.seed)
        ckpts = train_lora(self.model, examples, epochs=w.epochs, lr=w.lr, batch_size=w.batch_size,
                           pad_id=self.tokenizer.pad_token_id, seed=self.cfg.seed, grad_accum=w.grad_accum,
                           warmup_ratio=w.warmup_ratio, weight_decay=w.weight_decay, out_dir=stage.path,
                           desc="warmup", dist=self.dist)

        def finish() -> None:
            atomic_write_text(stage.path / "warmup_ids.json", json.dumps(sorted(ids)))
            stage.mark_done({**checkpoint_records(stage.path),
                             "warmup_ids.json": file_record(stage.path / "warmup_ids.json")})

        self.dist.on_main(finish)
        self.dist.wait_visible(stage.path / "DONE")
        return ckpts

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """The finished warmup's checkpoints (checked against the current config)."""
        read_stage(self.run_dir / "warmup", self.warmup_inputs(), "the warmup checkpoints", "nice-kit warmup (or run)")
        return load_checkpoints(self.run_dir / "warmup", strict=True)

    @cached_property
    def _gradient_dim(self) -> int:
        """D, the number of LoRA parameters (fixed by the config, so computed once per pipeline)."""
        done = load_checkpoints(self.run_dir / "warmup")
        # the Adam moments hold one value per LoRA parameter: no need to load the model
        return done[0].moments()[0].numel() if done else gradient_dim(self.model)

    def projection_spec(self, input_dim: int | None = None) -> ProjectionSpec:
        """The configured projection for this model's LoRA gradients (``input_dim`` given: no model load)."""
        p = self.cfg.projection
        if input_dim is None:
            input_dim = self._gradient_dim
        return ProjectionSpec(kind=p.kind, dim=p.dim, seed=p.seed, nnz=p.nnz, input_dim=input_dim)

    @cached_property
    def projector(self) -> Projector:
        return Projector(self.projection_spec(), device=self.device)

    def run_chunks(self, stage: Stage, n_items: int, shard: tuple[int, int],
                    compute: Callable[[int, int], dict[str, torch.Tensor]], desc: str) -> None:
        """Compute the shard's missing chunks with ``compute(start, stop)``; merge once every chunk exists.

        Under torchrun the shard is split again by rank, and rank 0 merges once every rank is done."""
        size = stage.chunk_size(self.cfg.gradients.chunk_size)
        # a chunk is reused when it is sound (checksum, shape, unit rows); a damaged one is recomputed
        todo = [c for c in shard_chunks(n_items, size, self.dist.shard(shard))
                if not drop_if_damaged(stage.chunk_path(c[0]), chunk_problem(stage.chunk_path(c[0]), c[2] - c[1]))]
        for c, start, stop in tqdm(todo, desc=desc, leave=False):
            save_tensors(compute(start, stop), stage.chunk_path(c))
        self.dist.barrier()  # every rank's chunks are on disk

        def merge() -> bool:
            if all(stage.chunk_path(c).exists() for c, _, _ in shard_chunks(n_items, size)):
                merge_chunks(stage, n_items, size)
                return True
            return False  # other hand-started shards (--shard) still missing

        if self.dist.on_main(merge):
            self.dist.wait_visible(stage.path / "DONE")

    def checkpoint_origin(self, ckpt: Checkpoint) -> dict[str, Any] | None:
        """The checkpoint's content as its stages record it (checksums from its state.json; None when the
        checkpoint predates them)."""
        files = ckpt.files or {}
        if not all(n in files for n in ("adapter/adapter_model.safetensors", "adam_moments.safetensors")):
            return None
        return {"checkpoint": f"epoch_{ckpt.epoch}", "adapter": files["adapter/adapter_model.safetensors"]["sha256"],
                "adam moments": files["adam_moments.safetensors"]["sha256"]}

    def vector_stage(self, folder: str, inputs: dict[str, Any], ids: list[str], ckpt: Checkpoint | None = None) -> Stage:
        with self.dist.main_first():  # rank 0 opens (or clears) the folder before the others look
            stage = open_stage(self.run_dir / "grads" / folder, inputs)
            if ckpt is not None:  # made from another checkpoint (recomputed with other bytes since): again
                stage.restart_if_made_from_other(self.checkpoint_origin(ckpt))
            adopt_legacy(stage)  # a finished stage made before checksums were kept: checked, then recorded
            if not (stage.path / "projection.json").exists():
                save_spec(self.projection_spec(), stage.path)
            if not (stage.path / "ids.json").exists():
                atomic_write_text(stage.path / "ids.json", json.dumps(ids))
        return stage

    @cached_property
    def _gradient_batch(self) -> BatchSize:
        """The gradient batch size, shared by every stage of this pipeline: lowered once on
        out-of-memory, it stays lowered (nice_kit.gradients.BatchSize)."""
        return BatchSize(self.cfg.gradients.batch_size)

    def project_gradients(self, seqs: list[WeightedSequence], n_groups: int, transform=None) -> dict[str, torch.Tensor]:
        """Projected gradients of ``n_groups`` groups of sequences: unit rows and their norms.

        :func:`nice_kit.gradients.projected_gradients` forms per-example gradients layer by layer
        during backward, computes logits only where a weight is non-zero, runs a prompt shared by a
        group's sequences once, and projects ``gradients.batch_size`` groups at a time."""
        out = projected_gradients(self.model, seqs, n_groups, self.tokenizer.pad_token_id, self.projector.project,
                                  transform, self._gradient_batch, log=lambda m: tqdm.write(f"[nice_kit] {m}"))
        return {"vectors": normalize_rows(out), "norms": out.norm(dim=1)}

    def train_gradients(self, shard: tuple[int, int] = (0, 1)) -> None:
        """Projected, Adam-preconditioned gradients of every pool example at every checkpoint."""
        pool_tok = None
        for ckpt in self.checkpoints:
            stage = self.vector_stage(f"train/epoch_{ckpt.epoch}", self.train_inputs(ckpt), [r.id for r in self.pool],
                                       ckpt)
            if stage.done:
                continue
            self.log(f"step: training gradients, epoch {ckpt.epoch} ({len(self.pool)} examples)")
            if pool_tok is None:
                pool_tok, _ = tokenize_records(self.tokenizer, self.pool, self.cfg.data.max_length)
            load_adapter_weights(self.model, ckpt)
            exp_avg, exp_avg_sq = (t.to(self.device) for t in ckpt.moments())

            def compute(start, stop):
                seqs = [mean_nll_sequence(pool_tok[i], i - start) for i in range(start, stop)]
                got = self.project_gradients(seqs, stop - start,
                                      lambda g: adam_precondition(g, exp_avg, exp_avg_sq, inplace=True))
                return chunk_tensors(got["vectors"], got["norms"])

            self.run_chunks(stage, len(pool_tok), shard, compute, f"train grads epoch {ckpt.epoch}")

    # ---- metrics and rollouts
    def metric(self):
        """The configured metric, built (a registered name with its parameters, or the user's callable)."""
        m = self.cfg.metric
        if self.cfg.data.label_free and isinstance(m.name, str):
            if metrics_mod.metric_info(m.name).needs_reference:
                raise ValueError(f"label-free mode needs a metric that reads no reference; {m.name!r} does")
        return metrics_mod.get_metric(m.name, **m.params)

    def metric_columns(self, records: list[Record]) -> tuple[dict[str, list[Any]], list[str], list[str]]:
        """The columns a metric receives for ``records`` (one entry per record), the names passed and
        the names withheld. Label-free: no reference column (``data.reference_columns``) and no
        reference answer reach any metric (:func:`nice_kit.config.metric_columns`)."""
        return metric_columns(records, self.cfg)

    def rollouts(self, ckpt: Checkpoint | None = None) -> pd.DataFrame:
        """Sampled completions of every target prompt with their rewards (sampled once, re-scored when
        the metric changes). With no checkpoint, all checkpoints' rollouts in one table."""
        if ckpt is None:
            return pd.concat([self.rollouts(c) for c in self.checkpoints], ignore_index=True)
        with self.dist.main_first():  # rank 0 opens (or clears) the folder before the others look
            stage = open_stage(self.run_dir / "rollouts" / f"epoch_{ckpt.epoch}", self.rollout_inputs(ckpt))
            stage.restart_if_made_from_other(self.checkpoint_origin(ckpt))
        samples_path = stage.path / "samples.jsonl"
        if not stage.done:
            self.log(f"step: rollouts, epoch {ckpt.epoch} ({len(self.target_val)} prompts x {self.cfg.rollouts.k})")
            size = stage.chunk_size(self.cfg.gradients.chunk_size)
            chunks = shard_chunks(len(self.target_val), size)
            mine = shard_chunks(len(self.target_val), size, self.dist.shard())  # all of them in one process
            k = self.cfg.rollouts.k
            todo = [c for c in mine if not drop_if_damaged(stage.chunk_path(c[0], ".jsonl"),
                                                           rows_problem(stage.chunk_path(c[0], ".jsonl"), (c[2] - c[1]) * k))]
            if todo:
                load_adapter_weights(self.model, ckpt)
            for c, start, stop in tqdm(todo, desc=f"rollouts epoch {ckpt.epoch}", leave=False):
                got = sample_rollouts(self.model, self.tokenizer, self.target_val[start:stop], self.cfg.rollouts,
                                      seed=self.cfg.seed, epoch=ckpt.epoch)
                write_rows(stage.chunk_path(c, ".jsonl"), got)
            self.dist.barrier()  # every rank's chunks are on disk

            def concatenate() -> None:
                missing = [c for c, _, _ in chunks if not stage.chunk_path(c, ".jsonl").exists()]
                if missing:
                    raise RuntimeError(f"{stage.path}: rollout chunks {missing} are missing; run the command again")
                rows = []
                for c, start, stop in chunks:
                    try:
                        rows += read_rows(stage.chunk_path(c, ".jsonl"), (stop - start) * k)
                    except IntegrityError as err:  # damaged since it was written: recomputed by the next run
                        stage.chunk_path(c, ".jsonl").unlink(missing_ok=True)
                        raise IntegrityError(err.path, err.problem + " (removed: run the command again to "
                                             "recompute it)") from None
                atomic_write_text(samples_path, "\n".join(rows) + "\n")
                atomic_write_text(stage.path / "sampling.json", json.dumps(self.cfg.rollouts.__dict__, indent=1))
                stage.mark_done(["samples.jsonl", "sampling.json"])

            self.dist.on_main(concatenate)
            self.dist.wait_visible(samples_path, stage.path / "DONE")
        df = pd.read_json(samples_path, lines=True, dtype={"prompt_id": str, "eos_token_id": "Int64"})
        df.insert(0, "epoch", ckpt.epoch)
        df["reward"] = self.dist.on_main(lambda: self.stored_rewards(stage.path, df))  # rank 0 scores, all receive
        return df

    def stored_rewards(self, folder: Path, df: pd.DataFrame) -> list[float]:
        """The metric's rewards of the stage's samples, cached beside them with their checksum and the
        checksum of the samples they score (a cache that does not match is recomputed, with a log line)."""
        path = folder / f"rewards_{fingerprint(self.reward_inputs())}.json"
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
            self.log(f"integrity: {path}: {problem} -- rescoring the samples")
        by_id = {r.id: r for r in self.target_val}
        recs = [by_id[i] for i in df["prompt_id"]]
        cols, passed, withheld = self.metric_columns(recs)
        if withheld:
            self.log(f"label-free: the metric receives columns {passed}; withheld: {withheld}")
        rewards = metrics_mod.score(self.metric(), [r.prompt for r in recs], df["completion"].tolist(), **cols)
        write_checked_json(path, rewards, samples_sha256=samples_sha, n=len(rewards))
        return rewards

    @on_rank_zero
    def reference_rewards(self) -> dict[str, float]:
        """The metric on each target prompt's reference answer (for the rejection variant)."""
        if self.cfg.data.label_free:
            return {}
        cols, _, _ = self.metric_columns(self.target_val)
        vals = metrics_mod.score(self.metric(), [r.prompt for r in self.target_val],
                                 [r.response for r in self.target_val], **cols)
        return {r.id: v for r, v in zip(self.target_val, vals)}

    def rollout_weights(self, ckpt: Checkpoint) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Rollouts with their policy-gradient weight, and per prompt (reference weight, signal, note)."""
        return PolicyGradient().weights(self.context, ckpt)

    # ---- validation gradients (what a measurement measures on the target prompts)
    def measurement(self, method: str | Measurement) -> Measurement:
        """The measurement a method name stands for (a built-in, or one used earlier in this pipeline)."""
        if isinstance(method, Measurement):
            self._measurements[method.name] = method
            return method
        if method in self._measurements:
            return self._measurements[method]
        return as_measurement(method)

    def _val_folder(self, m: Measurement, ckpt: Checkpoint) -> str:
        return f"val_{m.name}/epoch_{ckpt.epoch}"

    def validation_gradients(self, method: str | Measurement = "nice", shard: tuple[int, int] = (0, 1)) -> None:
        """Projected gradients of what ``method`` measures on each target prompt, per checkpoint:
        ``"less"`` (reference answers' mean NLL), ``"nice"`` (reward-weighted summed NLL of the
        model's own sampled completions) or any :class:`~nice_kit.measurements.Measurement`."""
        m = self.measurement(method)
        if m.needs_reference and self.cfg.data.label_free:
            raise ValueError(f"{m.name} needs reference answers (LESS needs reference answers); this run is label-free")
        val = self.target_val
        for ckpt in self.checkpoints:
            stage = self.vector_stage(self._val_folder(m, ckpt), self.val_inputs(m, ckpt), [r.id for r in val], ckpt)
            if stage.done:
                continue
            self.log(f"step: validation gradients ({m.name}), epoch {ckpt.epoch} ({len(val)} target prompts)")
            notes = m.prepare(self.context, ckpt)
            if notes is not None:
                atomic_write_text(stage.path / "notes.json", json.dumps(notes, indent=1))
            load_adapter_weights(self.model, ckpt)

            def compute(start, stop):
                measured = m.measure(self.context, ckpt, val[start:stop])
                got = self.project_gradients(measured.sequences, stop - start)
                valid = None if measured.valid is None else torch.tensor([float(v) for v in measured.valid])
                return chunk_tensors(got["vectors"], got["norms"], valid)

            self.run_chunks(stage, len(val), shard, compute, f"val grads ({m.name}) epoch {ckpt.epoch}")

    # ---- reading stored vectors (checked against the current config)
    def stored_vectors(self, which: str | Measurement = "train") -> list[StoredVectors]:
        """The finished vectors of ``"train"`` or of a measurement, one per checkpoint (memory-mapped).

        Raises :class:`~nice_kit.runs.StaleResultError` when they were made from other settings."""
        out = []
        for ckpt in self.checkpoints:
            if which == "train":
                folder, inputs = f"train/epoch_{ckpt.epoch}", self.train_inputs(ckpt)
                what, fix = f"training gradients (epoch {ckpt.epoch})", "nice-kit train-grads (or run)"
            else:
                name = which.name if isinstance(which, Measurement) else str(which).removeprefix("val_")
                m = self.measurement(which if isinstance(which, Measurement) else name)
                folder, inputs = self._val_folder(m, ckpt), self.val_inputs(m, ckpt)
                what = f"{m.name} validation gradients (epoch {ckpt.epoch})"
                fix = (f"nice-kit val-grads --method {m.name} (or run)" if m.name in ("less", "nice")
                       else f"run.validation_gradients({m!r})")
            stage = read_stage(self.run_dir / "grads" / folder, inputs, what, fix)
            stage.check_made_from(self.checkpoint_origin(ckpt), what, fix)
            stored = open_vectors(stage.path)
            stored.spec.check_compatible(self.projection_spec(stored.spec.input_dim), what)
            out.append(stored)
        return out

    def load_vectors(self, which: str | Measurement) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[str]]:
        """Vectors of ``"train"``, ``"val_less"``, ``"val_nice"`` (or a measurement) per checkpoint, as
        float32 tensors, with the validity masks and the ids."""
        stored = self.stored_vectors(which)
        valid = [None if s.valid is None else torch.from_numpy(s.valid.astype(np.float32)) for s in stored]
        return [s.all() for s in stored], valid, stored[0].ids

    # ---- influence and selection
    def default_methods(self) -> list[str]:
        return [m for m in self.cfg.selection.methods if not (m == "less" and self.cfg.data.label_free)]

    def target_subtasks(self) -> list[str]:
        col = self.cfg.data.subtask_column
        return [str(r.columns.get(col, "all")) for r in self.target_val]

    def scores_inputs(self, methods: list[str | Measurement]) -> dict[str, Any]:
        ckpts = self.checkpoints
        out: dict[str, Any] = {"train": [fingerprint(self.train_inputs(c)) for c in ckpts],
                               "selection.aggregate": self.cfg.selection.aggregate,
                               "data.subtask_column": self.cfg.data.subtask_column,
                               "subtasks": hashlib.sha256("\n".join(self.target_subtasks()).encode()).hexdigest()[:16]}
        for method in methods:
            m = self.measurement(method)
            out[m.name] = [fingerprint(self.val_inputs(m, c)) for c in ckpts]
        return out

    @on_rank_zero
    def scores(self, methods: list[str | Measurement] | None = None) -> pd.DataFrame:
        """Influence scores of every pool example, one column per method; written to scores.csv."""
        methods = methods or self.default_methods()
        train = self.stored_vectors("train")
        weights = checkpoint_weights(self.checkpoints)
        subtasks = self.target_subtasks()
        out = pd.DataFrame({"id": train[0].ids})
        for method in methods:
            m = self.measurement(method)
            val = self.stored_vectors(m)
            mask = None
            if val[0].valid is not None:  # a prompt counts if it has signal at any checkpoint
                mask = torch.from_numpy(counted_prompts([v.valid for v in val], len(subtasks)))
                if not mask.any():
                    raise ValueError(
                        f"{m.name}: none of the {len(subtasks)} target prompts got a non-zero policy gradient "
                        "at any checkpoint. Try a partial-credit or lenient metric, a longer warmup, more "
                        "samples (rollouts.k), a higher temperature, or no baseline.")
            out[m.name] = influence_scores(train, [v.all() for v in val], weights, subtasks, mask,
                                           self.cfg.selection.aggregate)
        path = self.run_dir / "scores.csv"
        tmp = tmp_path_for(path)
        with writing(path, tmp):  # atomic; a full disk: DiskFullError, nothing half-written left
            out.to_csv(tmp, index=False)
            tmp.replace(path)
        atomic_write_text(self.run_dir / "scores.json",
                          json.dumps({"inputs": self.scores_inputs(methods), "methods": [self.measurement(x).name
                                                                                         for x in methods],
                                      "scores.csv": file_record(self.run_dir / "scores.csv")}, indent=1))
        return out

    def read_scores(self, measurements: list[Measurement] | None = None) -> pd.DataFrame:
        """``scores.csv`` as a DataFrame, after checking it was computed from the current config's
        vectors (raises :class:`~nice_kit.runs.StaleResultError` naming what changed). Scores of your
        own measurements are checked too: pass them (or use them in this pipeline first)."""
        for m in measurements or []:
            self.measurement(m)
        path = self.run_dir / "scores.csv"
        meta = self.run_dir / "scores.json"
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
        unknown = [m for m in stored["methods"] if m not in self._measurements and m not in ("less", "nice")]
        if unknown:
            raise ValueError(f"{path} holds scores of your own measurement(s) {unknown}: pass them, "
                             "read_scores(measurements=[...]), to check those scores are current")
        self.stored_vectors("train")
        for m in stored["methods"]:
            self.stored_vectors(m)  # names the stage and the setting when a vector stage is stale
        current = self.scores_inputs(stored["methods"])
        if stored["inputs"] != current:
            from .runs import describe_changes

            changes = describe_changes(stored["inputs"], current)
            raise StaleResultError(f"{path} was computed from other vectors or settings:\n  " + "\n  ".join(changes)
                                   + "\nRecompute: nice-kit score (or run)")
        return pd.read_csv(path, dtype={"id": str})

    @on_rank_zero
    def select(self, scores: pd.DataFrame | None = None, fraction: float | None = None) -> dict[str, list[str]]:
        """Top ``fraction`` of the pool by each method's score; writes selected_<method>.jsonl and
        selected.jsonl (NICE's selection when present, else the first method's)."""
        scores = scores if scores is not None else self.read_scores()
        fraction = fraction or self.cfg.selection.fraction
        by_id = {r.id: r for r in self.pool}
        chosen = {}
        for m in [c for c in scores.columns if c != "id"]:
            ids = top_fraction(scores["id"].tolist(), scores[m].to_numpy(), fraction)
            save_records([by_id[i] for i in ids], self.run_dir / f"selected_{m}.jsonl")
            chosen[m] = ids
        primary = "nice" if "nice" in chosen else next(iter(chosen))
        save_records([by_id[i] for i in chosen[primary]], self.run_dir / "selected.jsonl")
        return chosen

    def what_if(self, changes: dict[str, Any] | None = None, **policy: Any):
        """NICE's scores and selection if the config had ``changes`` (dotted settings, or policy
        settings as keywords), from stored vectors: :func:`nice_kit.whatif.what_if`."""
        from .whatif import what_if

        return what_if(self, changes, **policy)

    def explain(self, example_id: str, method: str | Measurement = "nice", compute: bool = True):
        """Why pool example ``example_id`` got its score: the terms of its checkpoints, target prompts,
        subtasks and (NICE) sampled completions, adding up to the stored score
        (:func:`nice_kit.explain.explain`; NICE's per-completion gradients are computed on first use)."""
        from .explain import explain

        return explain(self, example_id, method, compute=compute)

    def run(self, methods: list[str | Measurement] | None = None) -> pd.DataFrame:
        """Every stage in order (each skipped when already done); returns the selection summary (with the
        benchmark's diagnostics when the pool carries its flag columns, see :mod:`nice_kit.diagnostics`)."""
        from .diagnostics import selection_summary

        methods = methods or self.default_methods()
        self.prepare()
        self.warmup()
        self.train_gradients()
        for m in methods:
            self.validation_gradients(m)
        # rank 0 scores, selects and writes the diagnostics; the other ranks wait for its summary
        return self.dist.on_main(lambda: selection_summary(self, self.select(self.scores(methods))))


__all__ = ["Pipeline", "StaleResultError", "load_tensors"]
