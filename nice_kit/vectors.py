"""Stored gradient vectors: unit rows in 16-bit floats, read in blocks from memory-mapped files.

A vector stage writes numbered chunk files (``chunk_*.safetensors``: ``vectors`` float16 unit rows,
``norms`` float32 lengths before normalisation, optionally ``valid``); once every chunk exists they
are streamed into ``vectors.npy`` (float16, n x d) and ``extras.npz``, never holding the whole matrix
in memory. Readers take rows in blocks with plain file reads (no mapping that stays resident), so a
pool of 270k examples x 8192 dimensions x several checkpoints is scored on a laptop.

Integrity: each chunk carries its tensors' SHA-256 and shapes (:func:`nice_kit.runs.save_tensors`);
the merge checks every chunk (checksum, shape, unit or zero rows, finite norms) and records in
``integrity.json`` the shape of ``vectors.npy`` with a fast checksum (:func:`nice_kit.runs.sum64`) of
every block of about 1 MiB of rows, and the SHA-256 of ``extras.npz``, ``ids.json`` and
``projection.json``. :func:`open_vectors` checks sizes and the small files; :meth:`StoredVectors.rows`
checks each block it reads, so a flipped byte raises :class:`~nice_kit.runs.IntegrityError` instead
of giving a wrong score.
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
from .runs import (INTEGRITY_FILE, STORE_DTYPE, SUM_BLOCK_BYTES, IntegrityError, Stage, check_file, file_record,
                   load_tensors, log, npy_header, shard_chunks, sum64, timed_check, writing)



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


UNIT_TOLERANCE = 2e-3  # |norm - 1| allowed for a float16 unit row (rounding moves it by ~5e-4 at most)


DEGENERATE_NORM = 1e-6  # a gradient this short is normalised by a clamped length: its row may be shorter than 1


def unit_problem(rows: np.ndarray, norms: np.ndarray | None = None) -> str | None:
    """What is wrong with stored rows that must be unit (or zero) vectors, or ``None``. With ``norms``
    (the lengths before normalisation), a row of a (nearly) zero gradient may be shorter than 1."""
    with timed_check():
        x = rows.astype(np.float32)
        if not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
            return f"row(s) {bad[:5].tolist()} hold non-finite values"
        n = np.sqrt((x * x).sum(axis=1))
        ok = (np.abs(n - 1) <= UNIT_TOLERANCE) | (n == 0)
        if norms is not None:
            ok |= (np.asarray(norms) < DEGENERATE_NORM) & (n <= 1 + UNIT_TOLERANCE)
        bad = np.flatnonzero(~ok)
        if len(bad):
            return f"row(s) {bad[:5].tolist()} are not unit vectors (norms {n[bad[:3]].round(4).tolist()})"
    return None


def chunk_problem(path: Path, n_rows: int, dim: int | None = None) -> str | None:
    """What is wrong with one chunk file of a vector stage (``None``: usable): unreadable, checksum,
    shape, non-unit rows, non-finite norms."""
    with timed_check():  # the whole check, reading the file included
        return _chunk_problem(path, n_rows, dim)


def _chunk_problem(path: Path, n_rows: int, dim: int | None) -> str | None:
    try:
        t = load_tensors(path)
    except IntegrityError as err:
        return err.problem
    if "vectors" not in t or "norms" not in t:
        return f"holds {sorted(t)}, expected vectors and norms"
    v = t["vectors"]
    if v.ndim != 2 or v.shape[0] != n_rows or (dim is not None and v.shape[1] != dim):
        return f"vectors of shape {list(v.shape)}, expected {[n_rows, dim if dim is not None else 'd']}"
    if t["norms"].shape != (n_rows,) or not torch.isfinite(t["norms"]).all():
        return f"norms of shape {list(t['norms'].shape)} (expected [{n_rows}]) or not finite"
    if "valid" in t and t["valid"].shape != (n_rows,):
        return f"validity mask of shape {list(t['valid'].shape)}, expected [{n_rows}]"
    return unit_problem(v.numpy(), t["norms"].numpy())


def block_rows_for(dim: int) -> int:
    """Rows per checksum block of a store with ``dim`` columns (about 1 MiB of float16)."""
    return max(1, SUM_BLOCK_BYTES // (dim * np.dtype(STORE_DTYPE).itemsize))


def vectors_record(path: Path) -> dict:
    """What integrity.json keeps of a ``vectors.npy``: size, shape, and a checksum per block of rows."""
    shape, offset = npy_header(path)
    n, d = shape
    block_rows = block_rows_for(d)
    row_bytes = d * np.dtype(STORE_DTYPE).itemsize
    blocks = []
    with timed_check(), open(path, "rb") as f:
        f.seek(offset)
        for _ in range(0, n, block_rows):
            blocks.append(sum64(f.read(block_rows * row_bytes)))
    return {"bytes": path.stat().st_size, "shape": [n, d], "offset": offset, "block_rows": block_rows,
            "blocks": blocks}


def merge_chunks(stage: Stage, n_items: int, chunk_size: int) -> None:
    """Stream the stage's chunk files into ``vectors.npy`` + ``extras.npz`` (atomically), record their
    checksums and mark the stage done. Every chunk is checked first (checksum, shape, unit rows); a
    damaged one is removed and :class:`~nice_kit.runs.IntegrityError` raised, so the next run
    recomputes it."""
    chunks = shard_chunks(n_items, chunk_size, (0, 1))
    d = None
    for c, start, stop in chunks:  # check every chunk before writing anything
        problem = chunk_problem(stage.chunk_path(c), stop - start, d)
        if problem:
            stage.chunk_path(c).unlink(missing_ok=True)
            raise IntegrityError(stage.chunk_path(c), problem + " (removed: the next run recomputes this chunk)")
        if d is None:
            d = load_tensors(stage.chunk_path(c), check=False)["vectors"].shape[1]
    first = load_tensors(stage.chunk_path(chunks[0][0]), check=False)
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = stage.path / f".vectors.npy.{tag}"
    norms = np.zeros(n_items, dtype=np.float32)
    valid = np.ones(n_items, dtype=bool) if "valid" in first else None
    with writing(stage.path / "vectors.npy", tmp), open(tmp, "wb") as out:
        write_npy_header(out, (n_items, d))
        for c, start, stop in chunks:
            t = first if c == chunks[0][0] else load_tensors(stage.chunk_path(c), check=False)
            rows = t["vectors"].numpy().astype(STORE_DTYPE, copy=False)
            out.write(np.ascontiguousarray(rows).tobytes())
            norms[start:stop] = t["norms"].numpy()
            if valid is not None:
                valid[start:stop] = t["valid"].numpy() > 0
    extras = {"norms": norms} if valid is None else {"norms": norms, "valid": valid}
    tmp_extras = stage.path / f".extras.{tag}.npz"
    with writing(stage.path / "extras.npz", tmp_extras):
        with open(tmp_extras, "wb") as f:
            np.savez(f, **extras)
        records = {"vectors.npy": vectors_record(tmp), "extras.npz": file_record(tmp_extras)}
    tmp_extras.replace(stage.path / "extras.npz")
    tmp.replace(stage.path / "vectors.npy")
    stage.mark_done(_with_small_files(stage.path, records))


def _with_small_files(folder: Path, records: dict) -> dict:
    """``records`` plus those of the stage's small files (ids, projection, notes) that exist."""
    for name in ("ids.json", "projection.json", "notes.json"):
        if (folder / name).exists():
            records[name] = file_record(folder / name)
    return records


def record_vectors(folder: Path, made_from: dict | None = None) -> None:
    """Write ``integrity.json`` for a finished vector store written by other means (a benchmark's
    synthetic store, or a stage finished before checksums were kept, after :func:`legacy_problem`)."""
    folder = Path(folder)
    records = _with_small_files(folder, {"vectors.npy": vectors_record(folder / "vectors.npy"),
                                         "extras.npz": file_record(folder / "extras.npz")})
    from .runs import atomic_write_text

    manifest = {"files": records, **({"made_from": made_from} if made_from else {})}
    atomic_write_text(folder / INTEGRITY_FILE, json.dumps(manifest, indent=1))


def legacy_problem(folder: Path) -> str | None:
    """The checks possible on a finished vector stage that has no ``integrity.json`` (made before
    nice_kit kept checksums): the header, the file size, the ids and norms, and unit rows."""
    folder = Path(folder)
    with timed_check():
        return _legacy_problem(folder)


def _legacy_problem(folder: Path) -> str | None:
    try:
        stored = open_vectors(folder)
        for a in range(0, len(stored), 8192):
            problem = unit_problem(stored.rows(a, a + 8192).numpy(), stored.norms[a:a + 8192])
            if problem:
                return f"vectors.npy rows from {a}: {problem}"
    except (IntegrityError, RuntimeError, OSError, ValueError, KeyError) as err:
        return str(err)
    return None


def adopt_legacy(stage: Stage) -> None:
    """Writer side, for a finished vector stage without checksums: check what can be checked, then
    record its checksums (or, when a check fails, reopen it so that it is merged or computed again)."""
    if not stage.done or stage.records() is not None:
        return
    problem = legacy_problem(stage.path)
    if problem is None:
        record_vectors(stage.path, stage.made_from)
        log(f"{stage.path}: made before nice_kit kept checksums; sizes, ids and unit rows checked, checksums "
            "recorded now")
        return
    log(f"integrity: {stage.path}: {problem} -- recomputing this stage's vectors")
    (stage.path / "DONE").unlink(missing_ok=True)
    (stage.path / "vectors.npy").unlink(missing_ok=True)


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
    blocks: list[str] | None = None  # checksum per block of rows (integrity.json); None: not recorded
    block_rows: int = 0

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
        row_bytes = d * np.dtype(STORE_DTYPE).itemsize
        first, last = start, stop
        if self.blocks is not None:  # read whole checksum blocks and check each
            b = self.block_rows
            first, last = (start // b) * b, min(n, -(-stop // b) * b)
        path = self.path / "vectors.npy"
        with open(path, "rb") as f:
            f.seek(self.offset + first * row_bytes)
            raw = f.read((last - first) * row_bytes)
        if len(raw) != (last - first) * row_bytes:
            raise IntegrityError(path, f"rows {first}-{last - 1} are cut short ({len(raw):,} of "
                                 f"{(last - first) * row_bytes:,} bytes): truncated")
        if self.blocks is not None:
            with timed_check():
                view = memoryview(raw)
                for k in range(first // self.block_rows, -(-last // self.block_rows)):
                    a = (k * self.block_rows - first) * row_bytes
                    if sum64(view[a:a + self.block_rows * row_bytes]) != self.blocks[k]:
                        raise IntegrityError(path, f"rows {k * self.block_rows}-{min(n, (k + 1) * self.block_rows) - 1}"
                                             " changed after they were written (checksum differs)")
        data = np.frombuffer(raw, dtype=STORE_DTYPE, offset=(start - first) * row_bytes, count=(stop - start) * d)
        return torch.from_numpy(data.reshape(stop - start, d).astype(np.float32))

    def all(self) -> torch.Tensor:
        return self.rows(0, None)

    def row(self, i: int) -> torch.Tensor:
        return self.rows(i, i + 1)[0]


def open_vectors(folder: Path) -> StoredVectors:
    """Open a finished vector stage folder: the header, sizes and small files are checked against
    ``integrity.json`` now, the rows' checksums as they are read. A damaged file raises
    :class:`~nice_kit.runs.IntegrityError` naming it."""
    folder = Path(folder)
    path = folder / "vectors.npy"
    shape, offset = npy_header(path)
    manifest = folder / INTEGRITY_FILE
    records = None
    if manifest.exists():
        try:
            records = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(manifest, "unreadable") from None
        for name, rec in records.items():
            problem = check_file(folder / name, rec, deep=name != "vectors.npy")
            if problem:
                raise IntegrityError(folder / name, problem)
        if list(shape) != list(records["vectors.npy"]["shape"]):
            raise IntegrityError(path, f"header says shape {list(shape)}, {records['vectors.npy']['shape']} was written")
    expected = offset + shape[0] * shape[1] * np.dtype(STORE_DTYPE).itemsize
    if path.stat().st_size != expected:
        raise IntegrityError(path, f"{path.stat().st_size:,} bytes, but a {shape[0]} x {shape[1]} float16 matrix "
                             f"takes {expected:,}" + (" (truncated)" if path.stat().st_size < expected else ""))
    try:
        extras = np.load(folder / "extras.npz")
        norms = extras["norms"]
        valid = extras["valid"] if "valid" in extras.files else None
    except FileNotFoundError:
        raise IntegrityError(folder / "extras.npz", "missing") from None
    except (ValueError, OSError, KeyError, EOFError) as err:
        raise IntegrityError(folder / "extras.npz", f"unreadable ({err})") from None
    try:
        ids = json.loads((folder / "ids.json").read_text())
    except FileNotFoundError:
        raise IntegrityError(folder / "ids.json", "missing") from None
    except ValueError:
        raise IntegrityError(folder / "ids.json", "not valid JSON: corrupted") from None
    if len(ids) != shape[0]:
        raise IntegrityError(folder, f"{len(ids)} ids for {shape[0]} vectors")
    if len(norms) != shape[0] or (valid is not None and len(valid) != shape[0]):
        raise IntegrityError(folder / "extras.npz", f"{len(norms)} norms for {shape[0]} vectors")
    rec = (records or {}).get("vectors.npy")
    return StoredVectors(folder, tuple(shape), offset, norms, valid, ids, load_spec(folder),
                         rec["blocks"] if rec else None, int(rec["block_rows"]) if rec else 0)
