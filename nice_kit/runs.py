"""Run directories: every stage writes into its own folder, keyed by a fingerprint of its inputs.

A stage folder holds ``stage.json`` (the fingerprint and what went into it) and, once finished,
``DONE``. Running a stage whose folder has the same fingerprint and ``DONE`` does nothing; a
different fingerprint clears the folder first. Per-example stages write numbered chunk files
atomically, so an interrupted stage resumes at its first missing chunk; a shard ``i`` of ``n``
computes only the chunks ``c`` with ``c % n == i``, and the merged chunks equal an unsharded run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable description of a stage's inputs."""
    blob = json.dumps({"v": FORMAT_VERSION, "obj": obj}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Stage:
    path: Path
    key: str

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def mark_done(self) -> None:
        (self.path / "DONE").write_text(self.key + "\n")

    def chunk_path(self, index: int, suffix: str = ".safetensors") -> Path:
        return self.path / f"chunk_{index:05d}{suffix}"


def open_stage(path: str | Path, inputs: Any) -> Stage:
    """Open (or reset) the folder of a stage whose inputs are described by ``inputs``."""
    path = Path(path)
    key = fingerprint(inputs)
    meta = path / "stage.json"
    if path.exists():
        old = json.loads(meta.read_text()).get("key") if meta.exists() else None
        if old != key:
            shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if not meta.exists():
        atomic_write_text(meta, json.dumps({"key": key, "inputs": inputs}, indent=1, default=str))
    return Stage(path, key)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write safetensors atomically (a crash leaves either the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def shard_chunks(n_items: int, chunk_size: int, shard: tuple[int, int] = (0, 1)) -> list[tuple[int, int, int]]:
    """The chunks ``(index, start, stop)`` of ``n_items`` that shard ``i`` of ``n`` computes."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    chunks = [(c, s, min(s + chunk_size, n_items)) for c, s in enumerate(range(0, n_items, chunk_size))]
    return [ch for ch in chunks if ch[0] % n == i]


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> (2, 8)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None
    shard_chunks(0, 1, (i, n))
    return i, n
