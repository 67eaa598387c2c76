"""The NICE / LESS pipeline over a run directory: a few verbs, each a cached, resumable stage.

    run = Pipeline(RunConfig.from_file("configs/default.toml"), "runs/default")
    run.warmup()                 # LoRA warmup checkpoints
    run.train_gradients()        # Adam-preconditioned, projected pool gradients per checkpoint
    run.validation_gradients("less")   # reference answers' NLL (LESS)
    run.validation_gradients("nice")   # reward-weighted NLL of sampled completions (NICE)
    scores = run.scores()        # DataFrame: id, less, nice  (also scores.csv)
    run.select()                 # selected.jsonl (+ selected_<method>.jsonl)

Run directory layout::

    config.json  prepare/  warmup/epoch_C/  grads/{train,val_less,val_nice}/epoch_C/
    rollouts/epoch_C/  scores.csv  selected*.jsonl  diagnostics.csv  evaluation/
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics as rewards_mod
from .config import RunConfig
from .data import Record, collate, file_digest, load_records, save_records, tokenize_pair, tokenize_records
from .gradients import WeightedSequence, adam_precondition, gradient_dim, group_gradients, mean_nll_sequence
from .data import prompt_ids
from .influence import influence_scores, random_subset, top_fraction
from .models import add_lora, load_model, load_tokenizer, set_threads
from .policy import policy_weights
from .projection import Projector, ProjectionSpec, load_spec, normalize_rows, save_spec
from .rollouts import sample_rollouts
from .runs import atomic_write_text, load_tensors, open_stage, save_tensors, shard_chunks
from .warmup import Checkpoint, checkpoint_weights, load_adapter_weights, load_checkpoints, train_lora

METHODS = ("less", "nice")


class Pipeline:
    """One run of the pipeline: a config and the run directory its stages write to."""

    def __init__(self, config: RunConfig, run_dir: str | Path, model=None, tokenizer=None, verbose: bool = True):
        self.cfg = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.verbose = verbose
        self._base_model, self._tokenizer = model, tokenizer
        self._peft = None
        atomic_write_text(self.run_dir / "config.json", json.dumps(config.to_dict(), indent=1, default=str))

    def log(self, msg: str) -> None:
        if self.verbose:
            tqdm.write(f"[nice_kit] {msg}")

    # -------------------------------------------------------------------------------------- inputs
    @cached_property
    def pool(self) -> list[Record]:
        return load_records(self.cfg.data.pool, require_response=True)

    @cached_property
    def target_val(self) -> list[Record]:
        return self._target(self.cfg.data.target_val)

    @cached_property
    def target_test(self) -> list[Record]:
        return self._target(self.cfg.data.target_test)

    def _target(self, path: str) -> list[Record]:
        records = load_records(path, require_response=not self.cfg.data.label_free)
        if self.cfg.data.label_free:  # label-free: no reference answer is read anywhere
            for r in records:
                r.response = None
        return records

    @cached_property
    def data_key(self) -> dict[str, str]:
        d = self.cfg.data
        return {"pool": file_digest(d.pool), "val": file_digest(d.target_val), "max_length": d.max_length,
                "label_free": d.label_free, "model": self.cfg.model}

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
            self._base_model, tok = load_model(self.cfg.model, device=self.cfg.device)
            self._tokenizer = self._tokenizer or tok
        if self._peft is None:
            self._peft = add_lora(self._base_model, self.cfg.lora, seed=self.cfg.seed)
            self._choose_threads()
        return self._peft

    def _choose_threads(self) -> None:
        if self.cfg.threads != "auto":
            set_threads(self.cfg.threads)
            return
        sample, _ = tokenize_records(self.tokenizer, self.pool[:4], self.cfg.data.max_length)
        batch = collate(sample, self.tokenizer.pad_token_id)
        n = set_threads("auto", self._peft, {k: v.to(next(self._peft.parameters()).device) for k, v in batch.items()})
        self.log(f"torch threads: {n} (measured)")

    # -------------------------------------------------------------------------------------- stages
    def prepare(self) -> dict[str, Any]:
        """Check and tokenise the data; report truncation. Writes prepare/stats.json."""
        max_len = self.cfg.data.max_length
        pool_tok, pool_trunc = tokenize_records(self.tokenizer, self.pool, max_len)
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

    @property
    def warmup_key(self) -> dict[str, Any]:
        c = self.cfg
        return {"data": self.data_key, "lora": c.lora.__dict__, "warmup": c.warmup.__dict__, "seed": c.seed}

    def warmup_ids(self) -> list[str]:
        """The random fraction of the pool the warmup trains on."""
        rng = np.random.default_rng(self.cfg.seed)
        n = max(1, int(round(self.cfg.warmup.fraction * len(self.pool))))
        picked = sorted(rng.choice(len(self.pool), size=n, replace=False).tolist())
        return [self.pool[i].id for i in picked]

    def warmup(self) -> list[Checkpoint]:
        """Train the warmup LoRA; one checkpoint per epoch (resumes after the last finished epoch)."""
        stage = open_stage(self.run_dir / "warmup", self.warmup_key)
        if stage.done:
            return load_checkpoints(stage.path)
        ids = set(self.warmup_ids())
        examples, _ = tokenize_records(self.tokenizer, [r for r in self.pool if r.id in ids], self.cfg.data.max_length)
        w = self.cfg.warmup
        self.log(f"warmup: {len(examples)} examples, {w.epochs} epochs")
        ckpts = train_lora(self.model, examples, epochs=w.epochs, lr=w.lr, batch_size=w.batch_size,
                           pad_id=self.tokenizer.pad_token_id, seed=self.cfg.seed, grad_accum=w.grad_accum,
                           warmup_ratio=w.warmup_ratio, weight_decay=w.weight_decay, out_dir=stage.path,
                           desc="warmup")
        atomic_write_text(stage.path / "warmup_ids.json", json.dumps(sorted(ids)))
        stage.mark_done()
        return ckpts

    @property
    def checkpoints(self) -> list[Checkpoint]:
        ckpts = load_checkpoints(self.run_dir / "warmup")
        if not ckpts or not (self.run_dir / "warmup" / "DONE").exists():
            raise RuntimeError(f"{self.run_dir}: the warmup has not finished; run the warmup stage first")
        return ckpts

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
        return Projector(self.projection_spec(), device=next(self.model.parameters()).device)

    def _vector_stage(self, name: str, ckpt: Checkpoint, extra: dict[str, Any]):
        key = {"warmup": self.warmup_key, "epoch": ckpt.epoch, "projection": self.projection_spec().to_dict(),
               "gradients": self.cfg.gradients.__dict__, **extra}
        stage = open_stage(self.run_dir / "grads" / name / f"epoch_{ckpt.epoch}", key)
        save_spec(self.projection_spec(), stage.path)
        return stage

    def _run_chunks(self, stage, n_items: int, shard: tuple[int, int], compute, desc: str) -> None:
        """Compute the shard's missing chunks with ``compute(start, stop) -> dict of tensors``; merge when all exist."""
        size = self.cfg.gradients.chunk_size
        todo = [c for c in shard_chunks(n_items, size, shard) if not stage.chunk_path(c[0]).exists()]
        for c, start, stop in tqdm(todo, desc=desc, leave=False):
            save_tensors(compute(start, stop), stage.chunk_path(c))
        all_chunks = shard_chunks(n_items, size, (0, 1))
        if all(stage.chunk_path(c).exists() for c, _, _ in all_chunks):
            parts = [load_tensors(stage.chunk_path(c)) for c, _, _ in all_chunks]
            merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            save_tensors(merged, stage.path / "vectors.safetensors")
            stage.mark_done()

    def train_gradients(self, shard: tuple[int, int] = (0, 1)) -> None:
        """Projected, Adam-preconditioned gradients of every pool example at every checkpoint."""
        pool_tok, _ = tokenize_records(self.tokenizer, self.pool, self.cfg.data.max_length)
        for ckpt in self.checkpoints:
            stage = self._vector_stage("train", ckpt, {"pool": self.data_key["pool"]})
            if stage.done:
                continue
            atomic_write_text(stage.path / "ids.json", json.dumps([r.id for r in self.pool]))
            load_adapter_weights(self.model, ckpt)
            exp_avg, exp_avg_sq = (t.to(next(self.model.parameters()).device) for t in ckpt.moments())

            def compute(start, stop):
                seqs = [mean_nll_sequence(pool_tok[i], i - start) for i in range(start, stop)]
                return {"vectors": self._projected(seqs, stop - start,
                                                   lambda g: adam_precondition(g, exp_avg, exp_avg_sq))}

            self._run_chunks(stage, len(pool_tok), shard, compute, f"train grads epoch {ckpt.epoch}")

    # ---- NICE: rollouts and rewards
    def _rollout_key(self, ckpt: Checkpoint) -> dict[str, Any]:
        return {"warmup": self.warmup_key, "epoch": ckpt.epoch, "rollouts": self.cfg.rollouts.__dict__}

    def metric(self):
        m = self.cfg.metric
        if self.cfg.data.label_free and isinstance(m.name, str):
            if rewards_mod.metric_info(m.name).needs_reference:
                raise ValueError(f"label-free mode needs a metric that reads no reference; {m.name!r} does")
        return rewards_mod.get_metric(m.name, **m.params)

    def _metric_key(self) -> dict[str, Any]:
        """What identifies the metric's rewards: its name and parameters, or a user function's source."""
        name = self.cfg.metric.name
        if callable(name):
            import hashlib
            import inspect

            try:
                source = inspect.getsource(name)
            except (OSError, TypeError):
                source = repr(name)
            name = f"{getattr(name, '__module__', '')}.{getattr(name, '__qualname__', type(name).__name__)}:" + \
                hashlib.sha256(source.encode()).hexdigest()[:12]
        return {"name": name, "params": self.cfg.metric.params}

    def _columns(self, records: list[Record]) -> dict[str, list[Any]]:
        names = sorted({k for r in records for k in r.columns})
        cols = {n: [r.columns.get(n) for r in records] for n in names}
        if not self.cfg.data.label_free:
            cols["response"] = [r.response for r in records]
        return cols

    def rollouts(self, ckpt: Checkpoint | None = None) -> pd.DataFrame:
        """Sampled completions of every target prompt with their rewards (sampled once, re-scored when
        the metric changes). With no checkpoint, all checkpoints' rollouts in one table."""
        if ckpt is None:
            return pd.concat([self.rollouts(c) for c in self.checkpoints], ignore_index=True)
        stage = open_stage(self.run_dir / "rollouts" / f"epoch_{ckpt.epoch}", self._rollout_key(ckpt))
        samples_path = stage.path / "samples.jsonl"
        if not samples_path.exists():
            load_adapter_weights(self.model, ckpt)
            rows = []
            size = self.cfg.gradients.chunk_size
            for c, start, stop in tqdm(shard_chunks(len(self.target_val), size), desc=f"rollouts epoch {ckpt.epoch}",
                                       leave=False):
                part = stage.chunk_path(c, ".jsonl")
                if not part.exists():
                    got = sample_rollouts(self.model, self.tokenizer, self.target_val[start:stop],
                                          self.cfg.rollouts, seed=self.cfg.seed * 7919 + ckpt.epoch * 101 + c)
                    atomic_write_text(part, "".join(json.dumps(r) + "\n" for r in got))
                rows += [json.loads(line) for line in part.read_text().splitlines()]
            atomic_write_text(samples_path, "".join(json.dumps(r) + "\n" for r in rows))
            stage.mark_done()
        df = pd.read_json(samples_path, lines=True, dtype={"prompt_id": str})
        df.insert(0, "epoch", ckpt.epoch)
        df["reward"] = self._rewards(stage.path, df)
        return df

    def _rewards(self, folder: Path, df: pd.DataFrame) -> list[float]:
        from .runs import fingerprint

        path = folder / f"rewards_{fingerprint(self._metric_key())}.json"
        if path.exists():
            return json.loads(path.read_text())
        by_id = {r.id: r for r in self.target_val}
        recs = [by_id[i] for i in df["prompt_id"]]
        cols = self._columns(recs)
        rewards = rewards_mod.score(self.metric(), [r.prompt for r in recs], df["completion"].tolist(), **cols)
        atomic_write_text(path, json.dumps(rewards))
        return rewards

    def reference_rewards(self) -> dict[str, float]:
        """The metric on each target prompt's reference answer (for the rejection variant)."""
        if self.cfg.data.label_free:
            return {}
        cols = self._columns(self.target_val)
        vals = rewards_mod.score(self.metric(), [r.prompt for r in self.target_val],
                                 [r.response for r in self.target_val], **cols)
        return {r.id: v for r, v in zip(self.target_val, vals)}

    def rollout_weights(self, ckpt: Checkpoint) -> tuple[pd.DataFrame, dict[str, Any]]:
        """Rollouts with their policy-gradient weight, and per prompt (reference weight, signal, note)."""
        p = self.cfg.policy
        df = self.rollouts(ckpt)
        ref = self.reference_rewards() if p.variant == "rejection" or p.fallback_to_reference else {}
        weights, per_prompt = np.zeros(len(df)), {}
        for pid, idx in df.groupby("prompt_id", sort=False).groups.items():
            idx = list(idx)
            pw = policy_weights(df.loc[idx, "reward"].tolist(), variant=p.variant, baseline=p.baseline,
                                topk=p.topk, reference_reward=ref.get(pid),
                                fallback_to_reference=p.fallback_to_reference and pid in ref,
                                divide_by_kept=p.divide_by_kept)
            weights[idx] = pw.completion
            per_prompt[pid] = pw
        df["weight"] = weights
        return df, per_prompt

    def validation_gradients(self, method: str = "nice", shard: tuple[int, int] = (0, 1)) -> None:
        """Validation gradients per target prompt and checkpoint: ``less`` (reference answers' mean NLL)
        or ``nice`` (reward-weighted summed NLL of the model's own sampled completions)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        if method == "less" and self.cfg.data.label_free:
            raise ValueError("LESS needs reference answers; this run is label-free")
        val, max_len = self.target_val, self.cfg.data.max_length
        for ckpt in self.checkpoints:
            extra = {"val": self.data_key["val"], "method": method}
            if method == "nice":
                extra.update(rollouts=self._rollout_key(ckpt), metric=self._metric_key(),
                             policy=self.cfg.policy.__dict__)
            stage = self._vector_stage(f"val_{method}", ckpt, extra)
            if stage.done:
                continue
            if method == "nice":
                df, per_prompt = self.rollout_weights(ckpt)
            atomic_write_text(stage.path / "ids.json", json.dumps([r.id for r in val]))
            if method == "nice":
                notes = {pid: {"signal": pw.signal, "note": pw.note, "reference_weight": pw.reference}
                         for pid, pw in per_prompt.items()}
                atomic_write_text(stage.path / "prompts.json", json.dumps(notes, indent=1))
                silent = [pid for pid, pw in per_prompt.items() if not pw.signal]
                if silent:
                    self.log(f"epoch {ckpt.epoch}: {len(silent)} of {len(val)} target prompts carry no signal "
                             "(all completions scored the same); left out of the aggregate")
            load_adapter_weights(self.model, ckpt)

            def compute(start, stop):
                seqs: list[WeightedSequence] = []
                valid = torch.ones(stop - start)
                for j in range(start, stop):
                    rec = val[j]
                    if method == "less":
                        seqs.append(mean_nll_sequence(tokenize_pair(self.tokenizer, rec.messages, rec.response, max_len),
                                                      j - start))
                        continue
                    pw = per_prompt[rec.id]
                    valid[j - start] = float(pw.signal)
                    p_ids = prompt_ids(self.tokenizer, rec.messages)
                    rows = df[df["prompt_id"] == rec.id]
                    for toks, w in zip(rows["token_ids"], rows["weight"]):
                        if w == 0:
                            continue
                        seqs.append(self._completion_sequence(p_ids, list(toks), w, j - start))
                    if pw.reference:
                        ref = tokenize_pair(self.tokenizer, rec.messages, rec.response, max_len)
                        seq = mean_nll_sequence(ref, j - start)
                        seq.weights = [x * pw.reference for x in seq.weights]
                        seqs.append(seq)
                return {"vectors": self._projected(seqs, stop - start), "valid": valid}

            self._run_chunks(stage, len(val), shard, compute, f"val grads ({method}) epoch {ckpt.epoch}")

    def _projected(self, seqs: list[WeightedSequence], n_groups: int, transform=None) -> torch.Tensor:
        """Unit-normalised projected gradients of ``n_groups`` groups of sequences, (n_groups, d).

        Groups are computed ``gradients.batch_size`` at a time (shortest first, to pad little) and
        projected at once, so full-size gradients never exceed batch_size x D floats in memory."""
        by_group: list[list[WeightedSequence]] = [[] for _ in range(n_groups)]
        for q in seqs:
            by_group[q.group].append(q)
        order = sorted(range(n_groups), key=lambda j: sum(len(q.input_ids) for q in by_group[j]))
        out = torch.zeros(n_groups, self.projector.spec.dim)
        step = self.cfg.gradients.batch_size
        for a in range(0, n_groups, step):
            groups = order[a:a + step]
            part = [WeightedSequence(q.input_ids, q.weights, i) for i, j in enumerate(groups) for q in by_group[j]]
            if not part:
                continue  # groups without sequences (no signal) stay zero
            g = group_gradients(self.model, part, len(groups), self.tokenizer.pad_token_id, step)
            if transform is not None:
                g = transform(g)
            out[groups] = normalize_rows(self.projector.project(g)).cpu()
        return out

    def _completion_sequence(self, p_ids: list[int], toks: list[int], weight: float, group: int) -> WeightedSequence:
        eos = self.tokenizer.eos_token_id
        comp = toks + ([eos] if eos is not None else [])
        comp = comp[: max(1, self.cfg.data.max_length - len(p_ids))]
        per_token = weight / len(comp) if self.cfg.policy.token_normalize else weight
        return WeightedSequence(p_ids + comp, [0.0] * len(p_ids) + [per_token] * len(comp), group)

    # ---- influence and selection
    def load_vectors(self, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[str]]:
        """Merged vectors of ``train``, ``val_less`` or ``val_nice`` per checkpoint (+ valid masks, ids)."""
        vecs, valid, ids = [], [], None
        for ckpt in self.checkpoints:
            folder = self.run_dir / "grads" / name / f"epoch_{ckpt.epoch}"
            if not (folder / "DONE").exists():
                missing = "" if not folder.exists() else " (some shards are missing)"
                raise RuntimeError(f"{folder}: {name} gradients are not finished{missing}")
            stored = load_spec(folder)
            stored.check_compatible(self.projection_spec(stored.input_dim), f"{name} vectors at epoch {ckpt.epoch}")
            t = load_tensors(folder / "vectors.safetensors")
            vecs.append(t["vectors"])
            valid.append(t.get("valid"))
            ids = json.loads((folder / "ids.json").read_text())
        return vecs, valid, ids

    def scores(self, methods: list[str] | None = None) -> pd.DataFrame:
        """Influence scores of every pool example, one column per method; written to scores.csv."""
        methods = methods or [m for m in self.cfg.selection.methods if not (m == "less" and self.cfg.data.label_free)]
        train, _, train_ids = self.load_vectors("train")
        weights = checkpoint_weights(self.checkpoints)
        col = self.cfg.data.subtask_column
        subtasks = [str(r.columns.get(col, "all")) for r in self.target_val]
        out = pd.DataFrame({"id": train_ids})
        for m in methods:
            val, valid, _ = self.load_vectors(f"val_{m}")
            mask = None
            if valid[0] is not None:  # a prompt counts if it has signal at any checkpoint
                mask = torch.stack([v.bool() for v in valid]).any(dim=0)
                if not mask.any():
                    raise ValueError(
                        f"{m}: none of the {len(subtasks)} target prompts got completions with differing rewards "
                        "at any checkpoint, so every policy gradient is zero. Try a partial-credit or lenient "
                        "metric, a longer warmup, more samples (rollouts.k) or a higher temperature.")
            out[m] = influence_scores(train, val, weights, subtasks, mask, self.cfg.selection.aggregate)
        out.to_csv(self.run_dir / "scores.csv", index=False)
        return out

    def select(self, scores: pd.DataFrame | None = None, fraction: float | None = None) -> dict[str, list[str]]:
        """Top ``fraction`` of the pool by each method's score; writes selected_<method>.jsonl and
        selected.jsonl (NICE's selection when present, else LESS's)."""
        scores = scores if scores is not None else pd.read_csv(self.run_dir / "scores.csv", dtype={"id": str})
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

    def diagnostics(self, chosen: dict[str, list[str]] | None = None) -> pd.DataFrame:
        """Share of harmful and of on-task examples in each method's selection (needs no retraining).

        Reads the benchmark's flag columns (``harmful``, ``on_task``), which no selector ever sees.
        ``random`` is the random baseline's subset for seed 0 (the one ``evaluation.compare`` trains on)."""
        chosen = chosen if chosen is not None else self.select()
        flags = pd.DataFrame([{"id": r.id, **{k: r.columns.get(k) for k in ("harmful", "on_task", "harm_kind")}}
                              for r in self.pool]).set_index("id")
        fraction = len(next(iter(chosen.values()))) / len(flags)
        rows = [("random", random_subset(list(flags.index), fraction, seed=0)), ("pool", list(flags.index))]
        rows += list(chosen.items())
        out = []
        for name, ids in rows:
            sub = flags.loc[ids]
            row = {"method": name, "k": len(ids)}
            for col in ("harmful", "on_task"):
                if sub[col].notna().all():
                    row[f"{col}_share"] = float(sub[col].astype(bool).mean())
            for kind in ("wrong_answer", "verbose", "bad_format"):
                row[f"{kind}_share"] = float((sub["harm_kind"] == kind).mean())
            out.append(row)
        df = pd.DataFrame(out)
        df.to_csv(self.run_dir / "diagnostics.csv", index=False)
        return df

    def run(self, methods: list[str] | None = None) -> pd.DataFrame:
        """Every stage in order (each skipped when already done); returns the diagnostics table."""
        methods = methods or [m for m in self.cfg.selection.methods if not (m == "less" and self.cfg.data.label_free)]
        self.prepare()
        self.warmup()
        self.train_gradients()
        for m in methods:
            self.validation_gradients(m)
        chosen = self.select(self.scores(methods))
        return self.diagnostics(chosen)
