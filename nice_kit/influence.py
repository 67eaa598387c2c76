"""Influence scores from projected gradients, and top-p selection.

s(z) = aggregate_j sum_c w_c cos(Gamma_c(z), G_{c,j}): the checkpoint-weighted cosine between a
training example's preconditioned gradient and each target prompt's validation gradient, then the
mean over the target prompts of each subtask and the max over subtasks (NICE.md, step 6). LESS and
NICE share this; they differ only in how G was measured.
"""

from __future__ import annotations

import numpy as np
import torch

AGGREGATES = ("max_of_means", "mean")


def influence_scores(train: list[torch.Tensor], val: list[torch.Tensor], weights: list[float],
                     subtasks: list[str], valid: torch.Tensor | None = None,
                     aggregate: str = "max_of_means") -> np.ndarray:
    """Scores of shape (n_train,).

    ``train[c]`` (n, d) and ``val[c]`` (m, d) are unit-normalised projected gradients at checkpoint c;
    ``subtasks`` names each target prompt's subtask; ``valid`` (m,) masks out target prompts that
    carry no signal (they count in no mean). A subtask with no valid prompt is left out of the max.
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
    sims = sum(w * (t.float() @ v.float().T) for w, t, v in zip(weights, train, val)).cpu()  # (n, m)
    if aggregate == "mean":
        return sims[:, valid].mean(dim=1).numpy()
    per_subtask = []
    for name in sorted(set(subtasks)):
        cols = torch.tensor([s == name for s in subtasks]) & valid
        if cols.any():
            per_subtask.append(sims[:, cols].mean(dim=1))
    return torch.stack(per_subtask, dim=1).max(dim=1).values.numpy()


def top_fraction(ids: list[str], scores: np.ndarray, fraction: float) -> list[str]:
    """Ids of the top ``fraction`` by score (at least one), highest first; ties broken by position."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if len(ids) != len(scores):
        raise ValueError("one score per id is needed")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    k = max(1, int(round(fraction * len(ids))))
    order = np.lexsort((np.arange(len(ids)), -np.asarray(scores)))
    return [ids[i] for i in order[:k]]


def random_subset(ids: list[str], fraction: float, seed: int) -> list[str]:
    """The random baseline's subset for ``seed``: the same ``fraction`` as the selectors, sorted ids."""
    rng = np.random.default_rng(10_000 + seed)
    k = max(1, int(round(fraction * len(ids))))
    return sorted(rng.choice(ids, size=k, replace=False).tolist())
