"""Stored gradient vectors: unit rows in 16-bit floats, read in blocks from memory-mapped files.

A vector stage writes numbered chunk files (``chunk_*.safetensors``: ``vectors`` float16 unit rows,
``norms`` float32 lengths before normalisation, optionally ``valid``); once every chunk exists they
are streamed into ``vectors.npy`` (float16, n x d) and ``extras.npz``, never holding the whole matrix
in memory. Readers take rows in blocks with plain file reads (no mapping that stays resident), so a
pool of 270k examples x 8192 dimensions x several checkpoints is scored on a laptop.
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


def write_npy_header(f, shape: tuple[int, int]) -> None:
    """The header of a float16 C-order ``.npy`` file of ``shape``; the rows follow as raw bytes."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(STORE_DTYPE).str, "fortran_order": False,
                                             "shape": tuple(int(x) for x in shape)})


def merge_chunks(stage: Stage, n_items: int, chunk_size: int) -> None:
    """Stream the stage's chunk files into ``vectors.npy`` + ``extras.npz`` (atomically) and mark it done."""
    chunks = shard_chunks(n_items, chunk_size, (0, 1))
    first = load_tensors(stage.chunk_path(chunks[0][0]))
    d = first["vectors"].shape[1]
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = stage.path / f".vectors.npy.{tag}"
    norms = np.zeros(n_items, dtype=np.float32)
    valid = np.ones(n_items, dtype=bool) if "valid" in first else None
    with open(tmp, "wb") as out:
        write_npy_header(out, (n_items, d))
        for c, start, stop in chunks:
            t = first if c == chunks[0][0] else load_tensors(stage.chunk_path(c))
            rows = t["vectors"].numpy().astype(STORE_DTYPE, copy=False)
            if rows.shape != (stop - start, d):
                raise RuntimeError(f"{stage.chunk_path(c)}: {rows.shape} rows, expected {(stop - start, d)}")
            out.write(np.ascontiguousarray(rows).tobytes())
            norms[start:stop] = t["norms"].numpy()
            if valid is not None:
                valid[start:stop] = t["valid"].numpy() > 0
    extras = {"norms": norms} if valid is None else {"norms": norms, "valid": valid}
    tmp_extras = stage.path / f".extras.{tag}.npz"
    with open(tmp_extras, "wb") as f:
        np.savez(f, **extras)
    tmp_extras.replace(stage.path / "extras.npz")
    tmp.replace(stage.path / "vectors.npy")
    stage.mark_done()


@dataclass
class StoredVectors:
    """One finished vector stage: ``rows(a, b)`` reads float32 unit rows; ``valid`` and ``norms`` per row."""

    path: Path
    shape: tuple[int, int]
    offset: int  # bytes before the first row in vectors.npy
    norms: np.ndarray
    valid: np.ndarray | None
    ids: list[str]
    spec: ProjectionSpec

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` as float32, read from disk (only those rows)."""
        n, d = self.shape
        stop = n if stop is None else min(stop, n)
        start = max(0, min(start, stop))
        itemsize = np.dtype(STORE_DTYPE).itemsize
        with open(self.path / "vectors.npy", "rb") as f:
            f.seek(self.offset + start * d * itemsize)
            data = np.frombuffer(f.read((stop - start) * d * itemsize), dtype=STORE_DTYPE)
        return torch.from_numpy(data.reshape(stop - start, d).astype(np.float32))

    def all(self) -> torch.Tensor:
        return self.rows(0, None)

    def row(self, i: int) -> torch.Tensor:
        return self.rows(i, i + 1)[0]


def open_vectors(folder: Path) -> StoredVectors:
    """Open a finished vector stage folder (nothing is read until rows are asked for)."""
    folder = Path(folder)
    with open(folder / "vectors.npy", "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran or np.dtype(dtype) != np.dtype(STORE_DTYPE) or len(shape) != 2:
        raise RuntimeError(f"{folder / 'vectors.npy'}: not a C-order float16 matrix; recompute this stage")
    extras = np.load(folder / "extras.npz")
    ids = json.loads((folder / "ids.json").read_text())
    if len(ids) != shape[0]:
        raise RuntimeError(f"{folder}: {len(ids)} ids for {shape[0]} vectors; recompute this stage")
    valid = extras["valid"] if "valid" in extras.files else None
    return StoredVectors(folder, tuple(shape), offset, extras["norms"], valid, ids, load_spec(folder))
