"""Stored gradient vectors: unit rows in 16-bit floats, read in blocks from memory-mapped files.

A vector stage writes numbered chunk files (``chunk_*.safetensors``: ``vectors`` float16 unit rows,
``norms`` float32 lengths before normalisation, optionally ``valid``); once every chunk exists they
are streamed into ``vectors.npy`` (float16, n x d) and ``extras.npz``, never holding the whole matrix
in memory. Readers memory-map ``vectors.npy`` and take rows in blocks, so a pool of 270k examples x
8192 dimensions x several checkpoints is scored on a laptop.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .projection import ProjectionSpec, load_spec
from .runs import Stage, load_tensors, shard_chunks

STORE_DTYPE = np.float16


def chunk_tensors(vectors: torch.Tensor, norms: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What one chunk file holds: unit rows in float16, their norms, and the validity mask if any."""
    out = {"vectors": vectors.to(torch.float16), "norms": norms.to(torch.float32)}
    if valid is not None:
        out["valid"] = valid.to(torch.float32)
    return out


def merge_chunks(stage: Stage, n_items: int, chunk_size: int) -> None:
    """Stream the stage's chunk files into ``vectors.npy`` + ``extras.npz`` (atomically) and mark it done."""
    chunks = shard_chunks(n_items, chunk_size, (0, 1))
    first = load_tensors(stage.chunk_path(chunks[0][0]))
    d = first["vectors"].shape[1]
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = stage.path / f".vectors.npy.{tag}"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=STORE_DTYPE, shape=(n_items, d))
    norms = np.zeros(n_items, dtype=np.float32)
    valid = np.ones(n_items, dtype=bool) if "valid" in first else None
    for c, start, stop in chunks:
        t = first if c == chunks[0][0] else load_tensors(stage.chunk_path(c))
        out[start:stop] = t["vectors"].numpy()
        norms[start:stop] = t["norms"].numpy()
        if valid is not None:
            valid[start:stop] = t["valid"].numpy() > 0
    out.flush()
    del out
    extras = {"norms": norms} if valid is None else {"norms": norms, "valid": valid}
    tmp_extras = stage.path / f".extras.{tag}.npz"
    with open(tmp_extras, "wb") as f:
        np.savez(f, **extras)
    tmp_extras.replace(stage.path / "extras.npz")
    tmp.replace(stage.path / "vectors.npy")
    stage.mark_done()


@dataclass
class StoredVectors:
    """One finished vector stage: ``rows(a, b)`` gives float32 unit rows; ``valid`` and ``norms`` per row."""

    path: Path
    vectors: np.ndarray  # memory-mapped (n, d) float16
    norms: np.ndarray
    valid: np.ndarray | None
    ids: list[str]
    spec: ProjectionSpec

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.vectors[start:stop], dtype=np.float32))

    def all(self) -> torch.Tensor:
        return self.rows(0, None)


def open_vectors(folder: Path) -> StoredVectors:
    """Open a finished vector stage folder (memory-mapped; nothing is read until rows are asked for)."""
    folder = Path(folder)
    vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    extras = np.load(folder / "extras.npz")
    ids = json.loads((folder / "ids.json").read_text())
    if len(ids) != vectors.shape[0]:
        raise RuntimeError(f"{folder}: {len(ids)} ids for {vectors.shape[0]} vectors; recompute this stage")
    valid = extras["valid"] if "valid" in extras.files else None
    return StoredVectors(folder, vectors, extras["norms"], valid, ids, load_spec(folder))
