"""Why an example scored what it did: its influence score taken apart, exactly, from stored vectors.

A pool example z's score (:mod:`nice_kit.influence`) is a weighted sum of cosines::

    s(z) = aggregate_j  sum_c w_c cos(Gamma_c(z), G_cj)

With ``max_of_means`` the aggregate is the mean over the winning subtask's valid target prompts
(the subtask whose mean is largest), with ``mean`` the mean over every valid prompt; either way it
is linear once the winner is known, so ``s(z) = sum_cj weight_cj * cos_cj`` with ``weight_cj =
w_c / n_S`` for the prompts of the winning subtask S (``w_c / n_valid`` under ``mean``) and 0
elsewhere. :func:`explain` returns every term; they add up to the score in ``scores.csv``.

For NICE, G_cj = sum_k a_cjk grad NLL_sum(y_cjk) over the prompt's sampled completions (plus the
reference answer when the rejection variant fell back to it), and a random projection P is linear, so
each completion k gets its own share of the prompt's term::

    weight_cj * <Gamma_hat, P(a_k g_k)> / |P G_cj|

P(a_k g_k) is the completion's own projected weighted gradient. They are a cached stage beside the
prompt vectors, ``grads/val_<method>_completions/epoch_C`` (unit rows in float16 and their norms, one
row per completion), made on first use (this needs the model) and read back afterwards without it.
The completions' shares add up to their prompt's term up to the float16 rounding of the stored unit
rows: see :func:`completion_tolerance`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .data import prompt_ids
from .gradients import WeightedSequence
from .influence import AGGREGATES, aggregate_similarities, counted_prompts, subtask_groups
from .measurements import Measurement, PolicyGradient, estimator_sequence
from . import stages
from .runs import read_stage
from .vectors import StoredVectors, chunk_tensors, open_vectors
from .warmup import checkpoint_weights, load_adapter_weights

if TYPE_CHECKING:  # pragma: no cover
    from .view import RunView
    from .warmup import Checkpoint

# The relative rounding of a float16 unit row's coordinates (10 stored mantissa bits, round to nearest).
FLOAT16_ROUNDING = 2.0 ** -11
# The relative difference between a prompt's projected gradient computed at once and as the sum of its
# completions' projected gradients computed one by one (float32 sums in another order and batch).
FLOAT32_RECOMPUTE = 1e-5

COMPLETION_COLUMNS = ["epoch", "prompt_id", "subtask", "sample", "kind", "text", "reward", "policy_weight",
                      "n_tokens", "gradient_norm", "cosine", "contribution"]


@dataclass
class Explanation:
    """One pool example's score taken apart (from :func:`explain`).

    * ``prompts``: one row per checkpoint and target prompt: ``epoch``, ``prompt_id``, ``subtask``,
      ``cosine`` (of the stored unit rows), ``checkpoint_weight`` (w_c), ``weight`` (the term's weight
      in the score), ``contribution`` (weight x cosine), ``valid`` (the prompt carries a signal at this
      checkpoint) and ``counted`` (it counts in the aggregate: valid at some checkpoint). The
      contributions add up to ``score``.
    * ``subtasks``: each subtask's number of counted prompts, its mean (of sum_c w_c cos_cj) and
      whether it won the max (``won``) and so counts in the score (``in_score``).
    * ``completions`` (NICE): one row per checkpoint, target prompt and sampled completion (plus a
      ``kind == "reference"`` row for a reference-answer fallback): ``text``, ``reward``,
      ``policy_weight`` (a_k), ``gradient_norm`` (|P(a_k g_k)|), ``cosine`` (with Gamma_hat) and
      ``contribution``; a prompt's rows add up to its contribution (see :meth:`completion_check`).
      None when the method samples nothing or the per-completion gradients were not computed
      (``note`` says which).
    """

    example_id: str
    method: str
    aggregate: str
    score: float  # the stored score (scores.csv)
    prompts: pd.DataFrame
    subtasks: pd.DataFrame
    completions: pd.DataFrame | None = None
    prompt_norms: pd.DataFrame | None = field(default=None, repr=False)  # epoch, prompt_id, norm |P G_cj|
    target_text: dict[str, str] = field(default_factory=dict, repr=False)
    note: str = ""

    @property
    def total(self) -> float:
        """The sum of every contribution (equals ``score`` to float32 rounding)."""
        return float(self.prompts["contribution"].sum())

    @property
    def winner(self) -> str | None:
        """The subtask whose mean is the score (None under the ``mean`` aggregate)."""
        won = self.subtasks[self.subtasks["won"]]
        return None if won.empty else str(won["subtask"].iloc[0])

    def by_prompt(self) -> pd.DataFrame:
        """One row per target prompt, summed over checkpoints, largest contribution first:
        ``prompt_id``, ``subtask``, ``counted``, ``similarity`` (sum_c w_c cos_cj, what enters the
        subtask mean), ``contribution`` and the prompt's text."""
        df = self.prompts.assign(similarity=self.prompts["checkpoint_weight"] * self.prompts["cosine"])
        out = (df.groupby("prompt_id", sort=False)
               .agg(subtask=("subtask", "first"), counted=("counted", "first"), similarity=("similarity", "sum"),
                    contribution=("contribution", "sum"))
               .reset_index())
        out["prompt"] = out["prompt_id"].map(self.target_text).fillna("")
        return out.sort_values("contribution", ascending=False, kind="mergesort").reset_index(drop=True)

    def top_prompt(self) -> str | None:
        """The target prompt whose contribution (over checkpoints) is largest in size, either sign."""
        per = self.by_prompt()
        per = per[per["contribution"] != 0]
        if per.empty:
            return None
        return str(per.loc[per["contribution"].abs().idxmax(), "prompt_id"])

    def completions_of(self, prompt_id: str) -> pd.DataFrame:
        """The completions of one target prompt (every checkpoint), largest contribution first."""
        if self.completions is None:
            return pd.DataFrame(columns=COMPLETION_COLUMNS)
        df = self.completions[self.completions["prompt_id"] == prompt_id]
        return df.sort_values(["contribution"], ascending=False, kind="mergesort").reset_index(drop=True)

    def completion_check(self) -> pd.DataFrame:
        """Per checkpoint and target prompt: its ``contribution``, the sum of its completions'
        (``completions``), their ``difference`` and the ``tolerance`` float16 storage allows
        (:func:`completion_tolerance`)."""
        if self.completions is None:
            raise ValueError(f"no completions in this explanation of {self.example_id} ({self.note or self.method})")
        sums = self.completions.groupby(["epoch", "prompt_id"], sort=False).agg(
            completions=("contribution", "sum"), gradient_norms=("gradient_norm", "sum")).reset_index()
        df = self.prompts.merge(sums, on=["epoch", "prompt_id"], how="left").merge(
            self.prompt_norms, on=["epoch", "prompt_id"], how="left")
        df[["completions", "gradient_norms"]] = df[["completions", "gradient_norms"]].fillna(0.0)
        df["difference"] = df["completions"] - df["contribution"]
        df["tolerance"] = completion_tolerance(df["weight"].to_numpy(), df["gradient_norms"].to_numpy(),
                                               df["norm"].to_numpy())
        return df[["epoch", "prompt_id", "contribution", "completions", "difference", "tolerance"]]


def completion_tolerance(weight, part_norms_sum, prompt_norm) -> np.ndarray:
    """How far a prompt's completion shares may add up from its contribution ``weight x cos``.

    ``weight * (2^-11 (1 + R) + 1e-5 R)`` with ``R = sum_k |P(a_k g_k)| / |P G|``: each stored unit row
    (the prompt's and every completion's) is rounded to float16, which moves its inner product with a
    unit vector by at most 2^-11 of the row's length, and the completions' gradients are recomputed in
    float32 in other batches. R is 1 when the completions' gradients point the same way and grows when
    they cancel (rewarded and punished completions of similar text)."""
    weight = np.abs(np.asarray(weight, dtype=np.float64))
    norm = np.asarray(prompt_norm, dtype=np.float64)
    ratio = np.divide(np.asarray(part_norms_sum, dtype=np.float64), norm, out=np.zeros_like(norm), where=norm > 0)
    return weight * (FLOAT16_ROUNDING * (1 + ratio) + FLOAT32_RECOMPUTE * ratio)


# ------------------------------------------------------------------------------------ the terms
def score_terms(cosines: np.ndarray, ckpt_weights, subtasks: list[str], counted: np.ndarray,
                aggregate: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The weight of every (checkpoint, target prompt) term in each example's score.

    ``cosines`` is (b, C, m): b examples, C checkpoints, m target prompts. Returns the weights
    (b, C, m), the subtask means (b, S) of sum_c w_c cos_cj over counted prompts, the index of each
    example's winning subtask (b,) (-1 under ``mean``) and the S subtask names (sorted, those with a
    counted prompt), as :func:`nice_kit.influence.influence_scores` aggregates them."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
    b, n_ckpt, m = cosines.shape
    w = np.asarray(ckpt_weights, dtype=np.float64)
    counted = np.asarray(counted, dtype=bool)
    if len(subtasks) != m or len(w) != n_ckpt or len(counted) != m:
        raise ValueError(f"{len(subtasks)} subtask labels, {len(w)} checkpoint weights and {len(counted)} "
                         f"validity flags for {n_ckpt} checkpoints x {m} target prompts")
    if not counted.any():
        raise ValueError("no target prompt carries a signal (every one was masked out)")
    sims = torch.from_numpy(np.einsum("c,bcm->bm", w, cosines))
    groups = subtask_groups(subtasks, counted)
    _, means, winner = aggregate_similarities(sims, groups, torch.from_numpy(counted), aggregate)
    means, winner = means.numpy(), winner.numpy()
    share = np.zeros((b, m))
    if aggregate == "mean":
        share[:, counted] = 1.0 / counted.sum()
    else:
        for s, (_, c) in enumerate(groups):
            c = c.numpy()
            share[np.ix_(winner == s, c)] = 1.0 / c.sum()
    return w[None, :, None] * share[:, None, :], means, winner, [name for name, _ in groups]


def _dots(stored: StoredVectors, x: np.ndarray, block_rows: int = 8192) -> np.ndarray:
    """Every stored unit row's inner product with ``x`` (float64), reading ``block_rows`` rows at a time."""
    return np.concatenate([stored.rows(a, a + block_rows).numpy() @ x for a in range(0, len(stored), block_rows)]
                          or [np.zeros(0)])


def _cosines(train: list[StoredVectors], val: list[np.ndarray], start: int, stop: int) -> np.ndarray:
    """(stop - start, C, m) inner products of the stored unit rows, in float64."""
    return np.stack([t.rows(start, stop).numpy().astype(np.float64) @ v.T for t, v in zip(train, val)], axis=1)


@dataclass
class _Inputs:
    """What every decomposition reads: stored vectors, weights, subtasks, validity."""

    measurement: Measurement
    train: list[StoredVectors]
    val: list[StoredVectors]
    val_rows: list[np.ndarray]  # float64 copies of the stored unit rows
    ckpt_weights: list[float]
    subtasks: list[str]
    counted: np.ndarray
    scores: pd.DataFrame


def _inputs(run: "RunView", method: str | Measurement) -> _Inputs:
    m = run.measurement(method)
    scores = run.read_scores()  # refuses stale scores, naming the stage and the setting
    if m.name not in scores.columns:
        raise ValueError(f"{run.run_dir / 'scores.csv'} holds no {m.name} scores (it has "
                         f"{[c for c in scores.columns if c != 'id']}); compute them: nice-kit score --methods ...")
    train, val = run.stored_vectors("train"), run.stored_vectors(m)
    n_prompts = len(val[0])
    counted = counted_prompts([v.valid for v in val], n_prompts)
    return _Inputs(m, train, val, [v.all().numpy().astype(np.float64) for v in val],
                   checkpoint_weights(run.checkpoints), run.target_subtasks(), counted, scores)


# ---------------------------------------------------------------------- per-completion gradients
def _parts_folder(m: Measurement, ckpt: "Checkpoint") -> str:
    return f"val_{m.name}_completions/epoch_{ckpt.epoch}"


def completion_inputs(run: "RunView", m: Measurement, ckpt: "Checkpoint") -> dict[str, Any]:
    """What the per-completion gradients depend on: the measurement's prompt vectors' inputs, plus a marker."""
    return {**run.val_inputs(m, ckpt), "parts": "one projected gradient per sampled completion and reference fallback"}


def completion_parts(run: "RunView", m: PolicyGradient, ckpt: "Checkpoint") -> pd.DataFrame:
    """The parts of each target prompt's gradient at ``ckpt``, in target order: every sampled
    completion (``kind == "completion"``, ``sample`` its number) and, where the rejection variant fell
    back to it, the reference answer (``kind == "reference"``, ``sample`` -1); with their ``text``,
    ``reward``, ``policy_weight`` and a ``part_id`` ("<prompt id>/<sample>" or "<prompt id>/reference")."""
    df, per_prompt = m.weights(run.context, ckpt)
    df = df.assign(prompt_id=df["prompt_id"].astype(str))
    order = {r.id: i for i, r in enumerate(run.target_val)}
    missing = sorted(set(df["prompt_id"]) - set(order))
    if missing:
        raise RuntimeError(f"rollouts of epoch {ckpt.epoch} name target prompts {missing[:5]} that are not in "
                           f"{run.cfg.data.target_val}; recompute the rollouts (nice-kit rollouts)")
    rows = pd.DataFrame({
        "prompt_id": df["prompt_id"], "sample": df["sample"].astype(int), "kind": "completion",
        "text": df["completion"].astype(str), "reward": df["reward"].astype(float),
        "policy_weight": df["weight"].astype(float),
        "n_tokens": df["token_ids"].map(len) if "token_ids" in df else df["n_tokens"],
        "token_ids": df["token_ids"], "ended_with_eos": df["ended_with_eos"].astype(bool),
        "eos_token_id": df["eos_token_id"] if "eos_token_id" in df else None})
    fallback = {pid: pw.reference for pid, pw in per_prompt.items() if pw.reference}
    if fallback:
        ref_rewards = run.reference_rewards()
        by_id = {r.id: r for r in run.target_val}
        refs = pd.DataFrame([{"prompt_id": pid, "sample": -1, "kind": "reference", "text": by_id[pid].response or "",
                              "reward": float(ref_rewards.get(pid, np.nan)), "policy_weight": float(a),
                              "n_tokens": 0, "token_ids": [], "ended_with_eos": False, "eos_token_id": None}
                             for pid, a in fallback.items()])
        rows = pd.concat([rows, refs], ignore_index=True)
    rows["_order"] = rows["prompt_id"].map(order)
    rows["_ref"] = rows["kind"] == "reference"
    rows = rows.sort_values(["_order", "_ref", "sample"], kind="mergesort").drop(columns=["_order", "_ref"])
    rows = rows.reset_index(drop=True)
    rows["part_id"] = [f"{p}/reference" if k == "reference" else f"{p}/{s}"
                       for p, k, s in zip(rows["prompt_id"], rows["kind"], rows["sample"])]
    return rows


def _attribute(run: "RunView", records, sequences: list[WeightedSequence], parts: pd.DataFrame
               ) -> dict[str, list[WeightedSequence]]:
    """Which part each of the measurement's sequences belongs to (``records[j]`` is group j).

    A completion's sequence is rebuilt with :func:`~nice_kit.measurements.estimator_sequence` and
    found among the measurement's; what is left of a prompt belongs to its reference row. Every
    sequence is attributed once, so a prompt's parts add up to exactly what its gradient sums."""
    by_group: dict[int, list[WeightedSequence]] = defaultdict(list)
    for q in sequences:
        by_group[q.group].append(q)
    out: dict[str, list[WeightedSequence]] = {}
    for j, rec in enumerate(records):
        left = by_group.pop(j, [])
        p_ids = prompt_ids(run.tokenizer, rec.messages)
        rows = parts[parts["prompt_id"] == rec.id]
        for r in rows[rows["kind"] == "completion"].itertuples():
            if r.policy_weight == 0:
                continue
            seq = estimator_sequence(run.context, p_ids, token_ids=r.token_ids, text=r.text, ended_with_eos=r.ended_with_eos,
                                     weight=float(r.policy_weight), group=j, eos_id=r.eos_token_id)
            if seq is None:
                continue
            k = next((i for i, q in enumerate(left) if q.input_ids == seq.input_ids and q.weights == seq.weights), None)
            if k is None:
                raise RuntimeError(f"target prompt {rec.id}, sample {r.sample}: the measurement's sequences do not "
                                   "include this completion as estimator_sequence builds it; cannot attribute")
            out[r.part_id] = [left.pop(k)]
        if left:
            ref = rows[rows["kind"] == "reference"]
            if ref.empty:
                raise RuntimeError(f"target prompt {rec.id}: {len(left)} sequence(s) of the measurement belong to "
                                   "no sampled completion and the prompt has no reference fallback; cannot attribute")
            out[str(ref["part_id"].iloc[0])] = left
    if by_group:
        raise RuntimeError(f"the measurement returned sequences for groups {sorted(by_group)} beyond its records")
    return out


def completion_vectors(run: "RunView", method: str | Measurement = "nice", compute: bool = True
                       ) -> list[tuple[pd.DataFrame, StoredVectors]]:
    """Per checkpoint: the parts table (:func:`completion_parts`) and the stored projected gradient of
    every part (one row each, in the table's order; ``norms`` their lengths).

    Computed on first use (``compute=True``: loads the model, resumable chunk by chunk) and read back
    afterwards, checked against the current config like every stage; ``compute=False`` raises
    instead of computing."""
    m = run.measurement(method)
    if not isinstance(m, PolicyGradient):
        raise ValueError(f"{m.name} samples no completions: only a policy-gradient measurement (nice) has "
                         "per-completion gradients")
    out = []
    for ckpt in run.checkpoints:
        folder, inputs = _parts_folder(m, ckpt), completion_inputs(run, m, ckpt)
        path = run.run_dir / "grads" / folder
        what = f"{m.name} per-completion gradients (epoch {ckpt.epoch})"
        fix = f"run.explain(example_id, {m.name!r}) or nice-kit explain ID --method {m.name} (computes them)"
        parts = completion_parts(run, m, ckpt)
        stored = stored_parts(run, ckpt, path, inputs, parts["part_id"].tolist(), what, fix,
                              (lambda: _compute_parts(run, m, ckpt, parts, folder, inputs)) if compute else None)
        out.append((parts, stored))
    return out


def stored_parts(run: "RunView", ckpt: "Checkpoint", path, inputs: dict[str, Any], ids: list[str], what: str,
                 fix: str, compute) -> StoredVectors:
    """A checkpoint's stored part vectors (explain's and what-if's per-completion stages), checked
    against ``inputs``, the checkpoint they were made from, the projection and ``ids``; ``compute()``
    (None: raise instead) makes them when they are missing, unfinished or stale."""
    try:
        stage = read_stage(path, inputs, what, fix)
        stage.check_made_from(stages.checkpoint_origin(ckpt), what, fix)
    except RuntimeError:  # missing, unfinished or stale (StaleResultError)
        if compute is None:
            raise
        compute()
        stage = read_stage(path, inputs, what, fix)
    stored = open_vectors(stage.path)
    stored.spec.check_compatible(run.projection_spec(stored.spec.input_dim), what)
    if stored.ids != ids:
        raise RuntimeError(f"{path}: its rows name other completions than the rollouts; {fix}")
    return stored


def _compute_parts(run: "RunView", m: PolicyGradient, ckpt: "Checkpoint", parts: pd.DataFrame, folder: str,
                   inputs: dict[str, Any]) -> None:
    stage = stages.vector_stage(run, folder, inputs, parts["part_id"].tolist(), ckpt)
    if stage.done:
        return
    run.log(f"step: per-completion gradients ({m.name}), epoch {ckpt.epoch} ({len(parts)} completions)")
    records = {r.id: r for r in run.target_val}
    loaded = []

    def compute(start: int, stop: int):
        if not loaded:  # only when a chunk is missing: a finished stage never loads the model
            load_adapter_weights(run.model, ckpt)
            loaded.append(True)
        block = parts.iloc[start:stop]
        recs = [records[pid] for pid in dict.fromkeys(block["prompt_id"])]
        measured = m.measure(run.context, ckpt, recs)  # exactly the sequences the prompt vectors sum
        owned = _attribute(run, recs, measured.sequences, parts[parts["prompt_id"].isin([r.id for r in recs])])
        seqs = [WeightedSequence(q.input_ids, q.weights, i)
                for i, pid in enumerate(block["part_id"]) for q in owned.get(pid, [])]
        got = run.project_gradients(seqs, stop - start)  # one group per part; parts without a sequence stay zero
        return chunk_tensors(got["vectors"], got["norms"])

    stages.run_chunks(run, stage, len(parts), (0, 1), compute, f"completion grads ({m.name}) epoch {ckpt.epoch}")


def _prompt_index(parts: pd.DataFrame, prompt_ids_: list[str]) -> np.ndarray:
    index = {p: j for j, p in enumerate(prompt_ids_)}
    return parts["prompt_id"].map(index).to_numpy()


# ----------------------------------------------------------------------------------- explain
def explain(run: "RunView", example_id: str, method: str | Measurement = "nice", compute: bool = True) -> Explanation:
    """Take pool example ``example_id``'s ``method`` score apart: per checkpoint and target prompt, per
    subtask and (NICE) per sampled completion. See :class:`Explanation`.

    Reads the stored vectors and ``scores.csv`` (refusing stale ones). For NICE the per-completion
    gradients are computed the first time (``compute=True``, needs the model); with ``compute=False``
    they are only read, and ``completions`` is None (with a ``note``) when they are not stored yet."""
    inp = _inputs(run, method)
    m = inp.measurement
    ids = inp.train[0].ids
    try:
        i = ids.index(str(example_id))
    except ValueError:
        raise KeyError(f"no pool example with id {example_id!r} in {run.cfg.data.pool}") from None
    cos = _cosines(inp.train, inp.val_rows, i, i + 1)
    aggregate = run.cfg.selection.aggregate
    weights, means, winner, names = score_terms(cos, inp.ckpt_weights, inp.subtasks, inp.counted, aggregate)
    epochs = [c.epoch for c in run.checkpoints]
    prompt_ids_ = inp.val[0].ids
    n_ckpt, n_prompts = len(epochs), len(prompt_ids_)
    valid = (np.stack([v.valid for v in inp.val]) if inp.val[0].valid is not None
             else np.ones((n_ckpt, n_prompts), dtype=bool))
    prompts = pd.DataFrame({
        "epoch": np.repeat(epochs, n_prompts), "prompt_id": prompt_ids_ * n_ckpt, "subtask": inp.subtasks * n_ckpt,
        "cosine": cos[0].ravel(), "checkpoint_weight": np.repeat(inp.ckpt_weights, n_prompts),
        "weight": weights[0].ravel(), "contribution": (weights[0] * cos[0]).ravel() + 0.0,  # no -0.0
        "valid": valid.ravel(), "counted": np.tile(inp.counted, n_ckpt)})
    labels = np.asarray(inp.subtasks, dtype=object)
    subtasks = pd.DataFrame({
        "subtask": names, "prompts": [int((inp.counted & (labels == s)).sum()) for s in names],
        "mean": means[0], "won": [aggregate != "mean" and s == winner[0] for s in range(len(names))],
        "in_score": [aggregate == "mean" or s == winner[0] for s in range(len(names))]})
    norms = pd.DataFrame({"epoch": np.repeat(epochs, n_prompts), "prompt_id": prompt_ids_ * n_ckpt,
                          "norm": np.concatenate([v.norms.astype(np.float64) for v in inp.val])})
    stored = inp.scores.loc[inp.scores["id"] == str(example_id), m.name]
    out = Explanation(str(example_id), m.name, aggregate, float(stored.iloc[0]), prompts, subtasks, None, norms,
                      {r.id: r.prompt for r in run.target_val})
    if not isinstance(m, PolicyGradient):
        out.note = f"{m.name} samples no completions: nothing below the target prompts"
        return out
    try:
        parts = completion_vectors(run, m, compute=compute)
    except RuntimeError as err:
        if compute:
            raise
        out.note = f"per-completion gradients not available: {err}"
        return out
    frames = []
    for c, (table, vecs) in enumerate(parts):
        gamma = inp.train[c].rows(i, i + 1).numpy().astype(np.float64)[0]
        j = _prompt_index(table, prompt_ids_)
        gcos = _dots(vecs, gamma)
        part_norm = vecs.norms.astype(np.float64)
        prompt_norm = inp.val[c].norms.astype(np.float64)[j]
        share = np.divide(part_norm * gcos, prompt_norm, out=np.zeros_like(gcos), where=prompt_norm > 0)
        frames.append(pd.DataFrame({
            "epoch": epochs[c], "prompt_id": table["prompt_id"], "subtask": labels[j], "sample": table["sample"],
            "kind": table["kind"], "text": table["text"], "reward": table["reward"],
            "policy_weight": table["policy_weight"], "n_tokens": table["n_tokens"], "gradient_norm": part_norm,
            "cosine": gcos, "contribution": weights[0, c, j] * share + 0.0}))
    out.completions = pd.concat(frames, ignore_index=True)[COMPLETION_COLUMNS]
    return out


def check_decomposition(run: "RunView", method: str | Measurement = "nice", completions: bool = True,
                        block_rows: int = 2048) -> pd.DataFrame:
    """Every pool example's decomposition against its stored score, computed the way :func:`explain`
    does (in blocks of ``block_rows`` examples).

    Columns: ``id``, ``stored`` (scores.csv), ``decomposed`` (the sum of the example's terms),
    ``difference``; for NICE with ``completions`` (computing the per-completion gradients when
    missing) also ``completion_difference`` (the largest |sum of a prompt's completion shares - its
    contribution| over checkpoints and prompts) and ``completion_ratio`` (the largest such difference
    over its :func:`completion_tolerance`: at most 1 when every prompt is within it). The completions'
    rows of every checkpoint are held in memory as float32 (rows x projection dim x 4 bytes each)."""
    inp = _inputs(run, method)
    m = inp.measurement
    aggregate = run.cfg.selection.aggregate
    ids = inp.train[0].ids
    stored = inp.scores.set_index("id")[m.name].reindex(ids).to_numpy(dtype=np.float64)
    parts = completion_vectors(run, m) if completions and isinstance(m, PolicyGradient) else None
    prompt_ids_ = inp.val[0].ids
    if parts is not None:  # per checkpoint: the part rows, their lengths, which prompt each belongs to
        part_rows = [vecs.all().numpy() for _, vecs in parts]  # float32: its rounding is far below float16's
        part_norms = [vecs.norms.astype(np.float64) for _, vecs in parts]
        owner = [np.eye(len(prompt_ids_))[_prompt_index(table, prompt_ids_)] for table, _ in parts]  # (rows, m)
        prompt_norms = [v.norms.astype(np.float64) for v in inp.val]
    decomposed = np.empty(len(ids))
    comp_diff, comp_ratio = np.zeros(len(ids)), np.zeros(len(ids))
    for start in range(0, len(ids), block_rows):
        stop = min(start + block_rows, len(ids))
        cos = _cosines(inp.train, inp.val_rows, start, stop)
        weights, _, _, _ = score_terms(cos, inp.ckpt_weights, inp.subtasks, inp.counted, aggregate)
        terms = weights * cos
        decomposed[start:stop] = terms.sum(axis=(1, 2))
        if parts is None:
            continue
        for c in range(len(parts)):
            gamma = inp.train[c].rows(start, stop).numpy()
            shares = ((gamma @ part_rows[c].T).astype(np.float64) * part_norms[c]) @ owner[c]  # (b, m): sum_k n_k cos_k per prompt
            norm = prompt_norms[c]
            summed = weights[:, c, :] * np.divide(shares, norm, out=np.zeros_like(shares), where=norm > 0)
            diff = np.abs(summed - terms[:, c, :])
            tol = completion_tolerance(weights[:, c, :], part_norms[c] @ owner[c], norm)
            ratio = np.divide(diff, tol, out=np.where(diff > 0, np.inf, 0.0), where=tol > 0)
            comp_diff[start:stop] = np.maximum(comp_diff[start:stop], diff.max(axis=1))
            comp_ratio[start:stop] = np.maximum(comp_ratio[start:stop], ratio.max(axis=1))
    out = pd.DataFrame({"id": ids, "stored": stored, "decomposed": decomposed, "difference": decomposed - stored})
    if parts is not None:
        out["completion_difference"] = comp_diff
        out["completion_ratio"] = comp_ratio
    return out


# ----------------------------------------------------------------------------------- printing
def _short(text: Any, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def format_explanation(expl: Explanation, top: int = 10) -> str:
    """The explanation as text (what ``nice-kit explain`` prints): the score and the winning subtask,
    the ``top`` largest (checkpoint, target prompt) contributions, then the top prompt's ``top``
    largest completion contributions."""
    lines = [f"{expl.method} score of {expl.example_id}: {expl.score:+.6g} (the contributions below add up to "
             f"{expl.total:+.6g})"]
    subs = ", ".join(f"{r.subtask} {r.mean:+.4g} ({r.prompts} prompts)" for r in expl.subtasks.itertuples())
    if expl.aggregate == "mean":
        lines.append(f"aggregate mean over every valid target prompt; subtask means: {subs}")
    else:
        lines.append(f"aggregate max_of_means: subtask {expl.winner!r} won; subtask means: {subs}")
    df = expl.prompts[expl.prompts["weight"] != 0]
    df = df.reindex(df["contribution"].abs().sort_values(ascending=False, kind="mergesort").index).head(top)
    df = df.sort_values("contribution", ascending=False, kind="mergesort")
    lines.append(f"\nTop {len(df)} of {int((expl.prompts['weight'] != 0).sum())} contributions "
                 "(checkpoint x target prompt):")
    table = df.assign(prompt=df["prompt_id"].map(expl.target_text).map(lambda t: _short(t, 50)))
    lines.append(table[["epoch", "prompt_id", "subtask", "cosine", "weight", "contribution", "prompt"]].to_string(
        index=False, float_format=lambda x: f"{x:+.4g}"))
    pid = expl.top_prompt()
    if expl.completions is None:
        if expl.note:
            lines.append(f"\n({expl.note})")
        return "\n".join(lines)
    if pid is None:
        lines.append("\nNo target prompt contributes: no completions to show.")
        return "\n".join(lines)
    per = expl.by_prompt().set_index("prompt_id")
    comp = expl.completions_of(pid)
    comp = comp.reindex(comp["contribution"].abs().sort_values(ascending=False, kind="mergesort").index).head(top)
    comp = comp.sort_values("contribution", ascending=False, kind="mergesort")
    lines.append(f"\nTop prompt {pid} ({per.loc[pid, 'subtask']}, contribution {per.loc[pid, 'contribution']:+.4g} "
                 f"over checkpoints): {_short(expl.target_text.get(pid, ''), 70)}")
    lines.append(f"its {len(comp)} largest completion contributions (policy weight > 0: rewarded, < 0: punished):")
    shown = comp.assign(sample=comp["sample"].map(lambda s: "ref" if s < 0 else str(s)),
                        text=comp["text"].map(lambda t: repr(_short(t, 50))))
    lines.append(shown[["epoch", "sample", "reward", "policy_weight", "contribution", "text"]].to_string(
        index=False, float_format=lambda x: f"{x:+.4g}"))
    return "\n".join(lines)


__all__ = ["Explanation", "explain", "check_decomposition", "completion_vectors", "completion_parts",
           "completion_tolerance", "format_explanation", "score_terms", "FLOAT16_ROUNDING"]
