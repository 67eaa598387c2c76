"""Influence scores from projected gradients, and top-p selection.

s(z) = aggregate_j sum_c w_c cos(Gamma_c(z), G_{c,j}): the checkpoint-weighted cosine between a
training example's preconditioned gradient and each target prompt's validation gradient, then the
mean over the target prompts of each subtask and the max over subtasks (docs/method.md, step 6).
LESS and NICE share this; they differ only in how G was measured.

The training side may be tensors or :class:`~nice_kit.vectors.StoredVectors` (memory-mapped
float16 rows): either way the pool is scored ``block_rows`` rows at a time, so memory stays
bounded by the block, not the pool.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .settings import AGGREGATES


def _rows(source, start: int, stop: int) -> torch.Tensor:
    if isinstance(source, torch.Tensor):  # float64 stays float64 (exactness checks); anything else float32
        rows = source[start:stop]
        return rows if rows.dtype == torch.float64 else rows.float()
    return source.rows(start, stop)


def similarity_matrix(train: Sequence, val: list[torch.Tensor], weights: list[float], start: int = 0,
                      stop: int | None = None) -> torch.Tensor:
    """sum_c w_c Gamma_c[start:stop] @ G_c^T: the checkpoint-weighted cosines, (rows, m) float32
    (float64 when the training rows are float64 tensors)."""
    stop = len(train[0]) if stop is None else stop
    out = None
    for w, t, v in zip(weights, train, val):
        rows = _rows(t, start, stop)
        part = w * (rows @ v.to(rows.dtype).T)
        out = part if out is None else out + part
    return out


def counted_prompts(valid: Sequence[np.ndarray | None], n_prompts: int) -> np.ndarray:
    """Which target prompts count in the aggregate: those that carry a signal at some checkpoint.

    ``valid[c]`` is checkpoint c's validity flags (None: every prompt is valid, as for LESS and the
    reference's estimator, which counts a zero gradient as a cosine of 0)."""
    if any(v is None for v in valid):
        return np.ones(n_prompts, dtype=bool)
    return np.stack([np.asarray(v, dtype=bool) for v in valid]).any(axis=0)


def _subtask_columns(subtasks: list[str], valid: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name in sorted(set(subtasks)):
        cols = torch.tensor([s == name for s in subtasks]) & valid
        if cols.any():
            out.append((name, cols))
    return out


def aggregate_similarities(sims: torch.Tensor, groups: list[tuple[str, torch.Tensor]], valid: torch.Tensor,
                           aggregate: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one aggregation of checkpoint-weighted cosines ``sims`` (b, m) into scores: the scores (b,),
    each subtask's mean over its valid prompts (b, S) for the S ``groups`` (name, prompt mask), and
    each example's winning subtask (b,), the first of equal means (-1 under ``mean``, which averages
    every valid prompt). :func:`influence_scores` scores with it; :mod:`nice_kit.explain` splits a
    score into its terms with it."""
    means = torch.stack([sims[:, cols].mean(dim=1) for _, cols in groups], dim=1)
    if aggregate == "mean":
        return sims[:, valid].mean(dim=1), means, torch.full((len(sims),), -1, dtype=torch.long)
    best = means.max(dim=1)
    return best.values, means, best.indices


def subtask_groups(subtasks: list[str], valid: torch.Tensor | np.ndarray | None = None) -> list[tuple[str, torch.Tensor]]:
    """(name, prompt mask) of each subtask that has a valid prompt, by name: the groups
    :func:`aggregate_similarities` takes."""
    m = len(subtasks)
    valid = torch.ones(m, dtype=torch.bool) if valid is None else torch.as_tensor(np.asarray(valid, dtype=bool))
    return _subtask_columns(subtasks, valid)


def influence_scores(train: Sequence, val: list[torch.Tensor], weights: list[float],
                     subtasks: list[str], valid: torch.Tensor | None = None,
                     aggregate: str = "max_of_means", block_rows: int = 8192,
                     by_subtask_means: bool = False) -> np.ndarray:
    """Scores of shape (n_train,).

    ``train[c]`` (n, d) and ``val[c]`` (m, d) are unit-normalised projected gradients at checkpoint c
    (``train[c]`` a tensor or stored vectors); ``subtasks`` names each target prompt's subtask;
    ``valid`` (m,) masks out target prompts that carry no signal (they count in no mean). A subtask
    with no valid prompt is left out of the max.

    ``by_subtask_means`` (nice_kit's speed option, used by the what-if): a subtask's mean cosine is
    linear in the validation vectors, mean_j Gamma . G_j = Gamma . mean_j G_j, so the pool is scored
    against one averaged vector per subtask (one in all under ``mean``) instead of one per target
    prompt: the same scores up to float rounding (tests/test_influence.py), at S / m of the
    multiply-adds. The stored scores (``run.scores``) are computed per prompt.
    """
    if not (len(train) == len(val) == len(weights)) or not train:
        raise ValueError("train, val and weights need one entry per checkpoint")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
    m = val[0].shape[0]
    if len(subtasks) != m:
        raise ValueError(f"{len(subtasks)} subtask labels for {m} target prompts")
    valid = torch.ones(m, dtype=torch.bool) if valid is None else valid.bool().cpu()
    if not valid.any():
        raise ValueError("no target prompt carries a signal (every one was masked out)")
    n = len(train[0])
    groups = _subtask_columns(subtasks, valid)
    if by_subtask_means:  # one averaged validation vector per subtask (or one in all), then the same aggregation
        cols = [valid] if aggregate == "mean" else [c for _, c in groups]
        val = [torch.stack([v[c].double().mean(dim=0) for c in cols]).to(v.dtype) for v in val]
        names = ["all"] if aggregate == "mean" else [name for name, _ in groups]
        groups = [(name, torch.arange(len(names)) == i) for i, name in enumerate(names)]
        valid = torch.ones(len(names), dtype=torch.bool)
    out = np.empty(n, dtype=np.float64 if isinstance(train[0], torch.Tensor) and train[0].dtype == torch.float64
                   else np.float32)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        sims = similarity_matrix(train, val, weights, start, stop).cpu()
        out[start:stop] = aggregate_similarities(sims, groups, valid, aggregate)[0].numpy()
    return out


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, highest first, ties broken by position (lower first).

    Equal to ``np.lexsort((arange, -scores))[:k]`` but O(n) for the partition instead of a full sort."""
    scores = np.asarray(scores)
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k == n:
        return np.lexsort((np.arange(n), -scores))
    kth = np.partition(scores, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(scores > kth)
    ties = np.flatnonzero(scores == kth)[: k - len(above)]
    picked = np.concatenate([above, ties])
    return picked[np.lexsort((picked, -scores[picked]))]


def top_fraction(ids: list[str], scores: np.ndarray, fraction: float) -> list[str]:
    """Ids of the top ``fraction`` by score (at least one), highest first; ties broken by position."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if len(ids) != len(scores):
        raise ValueError("one score per id is needed")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    k = max(1, int(round(fraction * len(ids))))
    return [ids[i] for i in top_k_indices(scores, k)]


def random_subset(ids: list[str], fraction: float, seed: int) -> list[str]:
    """The random baseline's subset for ``seed``: the same ``fraction`` as the selectors, sorted ids."""
    rng = np.random.default_rng(10_000 + seed)
    k = max(1, int(round(fraction * len(ids))))
    return sorted(rng.choice(ids, size=k, replace=False).tolist())
