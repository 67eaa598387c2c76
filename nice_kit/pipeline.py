"""The NICE / LESS pipeline over a run directory: a few verbs, each a cached, resumable stage.

    run = Pipeline(RunConfig.from_file("configs/default.toml"), "runs/default")
    run.warmup()                       # LoRA warmup checkpoints
    run.train_gradients()              # Adam-preconditioned, projected pool gradients per checkpoint
    run.validation_gradients("less")   # what LESS measures: reference answers' NLL
    run.validation_gradients("nice")   # what NICE measures: reward-weighted NLL of sampled completions
    scores = run.scores()              # DataFrame: id, less, nice  (also scores.csv)
    run.select()                       # selected.jsonl (+ selected_<method>.jsonl)

What is measured on the target prompts is a :class:`~nice_kit.measurements.Measurement` (``"less"``
and ``"nice"`` name the built-in ones). The stages are :mod:`nice_kit.stages`; what each stored
result depends on, :mod:`nice_kit.keys` (a stage is reused only when that is unchanged, and every
reader refuses stale results; README, "Runs on disk").
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import keys, stages
from .config import RunConfig, read_run_config, validate_config
from .data import Record, file_digest, load_records
from .distributed import SINGLE, Dist, on_rank_zero
from .gradients import WeightedSequence
from .measurements import MeasureContext, Measurement, Measurements, PolicyGradient
from .metrics.records import build_metric, load_targets, metric_columns
from .models import LazyModel, auto_threads
from .projection import Projector, ProjectionSpec
from .runs import StaleResultError, atomic_write_text, load_tensors, read_stage
from .vectors import StoredVectors
from .warmup import Checkpoint, load_checkpoints


class Pipeline:
    """One run: a config and the run directory its stages write to. The stages themselves are
    :mod:`nice_kit.stages`; what they depend on, :mod:`nice_kit.keys`."""

    def __init__(self, config: RunConfig, run_dir: str | Path, model=None, tokenizer=None, verbose: bool = True,
                 dist: Dist | None = None, write_config: bool = True):
        # a config edited in Python is checked too; the model itself is checked when it is loaded, so a
        # finished run made elsewhere opens without it
        validate_config(config, check_model=False)
        self.cfg = config
        self.dist = dist or SINGLE  # the processes sharing this run (nice_kit.distributed); one by default
        self.run_dir = Path(run_dir)
        self.verbose = verbose
        self._model = LazyModel(config.model, config.lora, config.seed, self.dist.device(config.device), model,
                                tokenizer, log=self.log, on_load=self._choose_threads)
        self._measurements = Measurements()
        if write_config:  # False: a view (Pipeline.open, what-ifs) writes no config and makes no folder
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.json", json.dumps(config.to_dict(), indent=1, default=str))

    @classmethod
    def open(cls, run_dir: str | Path, verbose: bool = False) -> "Pipeline":
        """A finished run for viewing, from its ``config.json``: reading it writes nothing (its config
        is not rewritten, no folder is made) and every reader checks what it reads is current. The
        model is loaded only if something must be computed, so a run made elsewhere opens without it.
        Data paths that do not exist from here are looked for beside the run (``run_dir/data/<name>``)."""
        return cls(read_run_config(run_dir), run_dir, verbose=verbose, write_config=False)

    def sibling(self, run_dir: str | Path, config: RunConfig) -> "Pipeline":
        """Another run with ``config`` in ``run_dir`` sharing this one's model (loaded now) and tokenizer."""
        self.model  # noqa: B018 - loaded now, so that both share one LoRA-wrapped model
        return self.with_config(config, write_config=True, run_dir=run_dir)

    def with_config(self, config: RunConfig, write_config: bool = False, run_dir: str | Path | None = None) -> "Pipeline":
        """This run (or ``run_dir``) under another ``config``, sharing what this pipeline has loaded (nothing
        is loaded now). ``write_config=False``, a view as a what-if takes, leaves ``config.json`` alone."""
        other = Pipeline(config, run_dir or self.run_dir, verbose=self.verbose, dist=self.dist, write_config=write_config)
        other._model = self._model.shared(other._choose_threads)
        return other

    @cached_property
    def context(self) -> MeasureContext:
        """What measurements receive of this run (:class:`nice_kit.measurements.MeasureContext`)."""
        return MeasureContext(self)

    def log(self, msg: str) -> None:
        if self.verbose:
            tqdm.write(f"[nice_kit] {msg}")

    # ---------------------------------------------------------------------------- data and model
    @cached_property
    def pool(self) -> list[Record]:
        return load_records(self.cfg.data.pool, require_response=True, columns=self.cfg.data.columns)

    @cached_property
    def target_val(self) -> list[Record]:
        return load_targets(self.cfg.data.target_val, self.cfg)

    @cached_property
    def target_test(self) -> list[Record]:
        return load_targets(self.cfg.data.target_test, self.cfg)

    def target_subtasks(self) -> list[str]:
        col = self.cfg.data.subtask_column
        return [str(r.columns.get(col, "all")) for r in self.target_val]

    @property
    def tokenizer(self):
        """The tokenizer (loaded on its own: stages that only read the run never load the model)."""
        return self._model.tokenizer

    @property
    def model(self):
        """The base model wrapped in a LoRA adapter (weights set per checkpoint by the stages)."""
        return self._model.model

    @property
    def holds_model(self) -> bool:
        """Whether this pipeline was given (or has loaded) a model: new gradients need no model load."""
        return self._model.loaded

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def model_context(self) -> int | None:
        return self._model.context_length()

    def _choose_threads(self, peft) -> None:
        threads = self.dist.cpu_threads(self.cfg.threads)  # under torchrun: cores shared by the processes
        auto_threads(threads, peft, self.tokenizer, self.pool[:4], self.cfg.data.max_length, self.log)

    # ------------------------------------------------------------ what stages depend on (nice_kit.keys)
    @cached_property
    def pool_digest(self) -> str:
        return file_digest(self.cfg.data.pool)

    @cached_property
    def target_digest(self) -> str:
        return file_digest(self.cfg.data.target_val)

    def warmup_inputs(self) -> dict[str, Any]:
        return keys.warmup_inputs(self.cfg, self.pool_digest)

    def train_inputs(self, ckpt: Checkpoint) -> dict[str, Any]:
        return keys.train_inputs(self.warmup_inputs(), ckpt.epoch, self.projection_spec().to_dict())

    def rollout_inputs(self, ckpt: Checkpoint) -> dict[str, Any]:
        prompts = keys.records_digest(self.target_val, with_response=False)
        return keys.rollout_inputs(self.cfg, self.warmup_inputs(), ckpt.epoch, prompts)

    def reward_inputs(self) -> dict[str, Any]:
        cols, passed, _ = self.metric_columns(self.target_val)
        return keys.reward_inputs(self.cfg, cols, passed)

    def val_inputs(self, measurement: Measurement, ckpt: Checkpoint) -> dict[str, Any]:
        return keys.val_inputs(self.cfg, self.train_inputs(ckpt), self.target_digest, measurement.name,
                               measurement.key(self.context, ckpt))

    def scores_inputs(self, methods: list[str | Measurement]) -> dict[str, Any]:
        ckpts, ms = self.checkpoints, [self.measurement(m) for m in methods]
        return keys.scores_inputs(self.cfg, [self.train_inputs(c) for c in ckpts], self.target_subtasks(),
                                  {m.name: [self.val_inputs(m, c) for c in ckpts] for m in ms})

    # ------------------------------------------------------------------- gradients and measurements
    @property
    def checkpoints(self) -> list[Checkpoint]:
        """The finished warmup's checkpoints (checked against the current config)."""
        read_stage(self.run_dir / "warmup", self.warmup_inputs(), "the warmup checkpoints", "nice-kit warmup (or run)")
        return load_checkpoints(self.run_dir / "warmup", strict=True)

    @cached_property
    def _projection(self) -> stages.GradientProjection:
        return stages.GradientProjection(self)

    def projection_spec(self, input_dim: int | None = None) -> ProjectionSpec:
        """The configured projection of this model's LoRA gradients (``input_dim`` given: no model load)."""
        return self._projection.spec(input_dim)

    @property
    def projector(self) -> Projector:
        return self._projection.projector

    def project_gradients(self, seqs: list[WeightedSequence], n_groups: int, transform=None) -> dict[str, torch.Tensor]:
        """Projected gradients of ``n_groups`` groups of sequences: unit rows and their norms."""
        return self._projection.project(seqs, n_groups, transform)

    def measurement(self, method: str | Measurement) -> Measurement:
        """The measurement a method name stands for (a built-in, or one used earlier in this pipeline)."""
        return self._measurements.get(method)

    def knows_measurement(self, name: str) -> bool:
        return self._measurements.knows(name)

    def default_methods(self) -> list[str]:
        return [m for m in self.cfg.selection.methods if not (m == "less" and self.cfg.data.label_free)]

    def metric(self):
        """The configured metric, built (a registered name with its parameters, or the user's callable)."""
        return build_metric(self.cfg)

    def metric_columns(self, records: list[Record]) -> tuple[dict[str, list[Any]], list[str], list[str]]:
        """The columns a metric receives for ``records``, the names passed and the names withheld
        (label-free: no reference column or answer reaches any metric; :func:`metric_columns`)."""
        return metric_columns(records, self.cfg)

    # -------------------------------------------------------------------- the stages (nice_kit.stages)
    @on_rank_zero
    def prepare(self) -> dict[str, Any]:
        """Check and tokenise the data, report truncation and size warnings (prepare/stats.json)."""
        return stages.prepare(self)

    def warmup(self) -> list[Checkpoint]:
        """Train the warmup LoRA; one checkpoint per epoch (resumes after the last finished epoch)."""
        return stages.warmup(self)

    def train_gradients(self, shard: tuple[int, int] = (0, 1)) -> None:
        """Projected, Adam-preconditioned gradients of every pool example at every checkpoint."""
        stages.train_gradients(self, shard)

    def rollouts(self, ckpt: Checkpoint | None = None) -> pd.DataFrame:
        """Sampled completions of every target prompt with their rewards (all checkpoints' when none given)."""
        return stages.rollouts(self, ckpt)

    @on_rank_zero
    def reference_rewards(self) -> dict[str, float]:
        """The metric on each target prompt's reference answer (for the rejection variants)."""
        return stages.reference_rewards(self)

    def rollout_weights(self, ckpt: Checkpoint) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Rollouts with their policy-gradient weight, and per prompt (reference weight, signal, note)."""
        return PolicyGradient().weights(self.context, ckpt)

    def validation_gradients(self, method: str | Measurement = "nice", shard: tuple[int, int] = (0, 1)) -> None:
        """Projected gradients of what ``method`` (``"less"``, ``"nice"`` or any
        :class:`~nice_kit.measurements.Measurement`) measures on each target prompt, per checkpoint."""
        stages.validation_gradients(self, method, shard)

    def stored_vectors(self, which: str | Measurement = "train") -> list[StoredVectors]:
        """The finished, current vectors of ``"train"`` or of a measurement, one per checkpoint."""
        return stages.stored_vectors(self, which)

    def load_vectors(self, which: str | Measurement) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[str]]:
        """Vectors per checkpoint as float32 tensors, with the validity masks and the ids."""
        return stages.load_vectors(self, which)

    @on_rank_zero
    def scores(self, methods: list[str | Measurement] | None = None) -> pd.DataFrame:
        """Influence scores of every pool example, one column per method; written to scores.csv."""
        return stages.scores(self, methods)

    def read_scores(self, measurements: list[Measurement] | None = None) -> pd.DataFrame:
        """``scores.csv``, checked against the current config's vectors (pass your own measurements)."""
        return stages.read_scores(self, measurements)

    @on_rank_zero
    def select(self, scores: pd.DataFrame | None = None, fraction: float | None = None) -> dict[str, list[str]]:
        """Top ``fraction`` of the pool by each method's score (selected_<method>.jsonl, selected.jsonl)."""
        return stages.select(self, scores, fraction)

    def what_if(self, changes: dict[str, Any] | None = None, **policy: Any):
        """NICE's scores and selection if the config had ``changes``, from stored vectors
        (:func:`nice_kit.whatif.what_if`)."""
        from .whatif import what_if

        return what_if(self, changes, **policy)

    def explain(self, example_id: str, method: str | Measurement = "nice", compute: bool = True):
        """Why pool example ``example_id`` got its score, in terms that add up to it (:func:`nice_kit.explain.explain`)."""
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
