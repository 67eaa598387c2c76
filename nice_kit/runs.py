"""Run directories: every stage writes into its own folder, keyed by a description of its inputs.

A stage folder holds ``stage.json`` (the key and the inputs it was made from) and, once finished,
``DONE``. A writer opening a stage whose ``stage.json`` has the same key resumes it (or does nothing
when ``DONE``); a different key clears the folder first. A *reader* never clears anything: it checks
the stored inputs against what the current config would produce and, when they differ, raises
:class:`StaleResultError` naming the stage and the settings that changed.

Per-item stages write numbered chunk files atomically, so an interrupted stage resumes at its first
missing chunk. The chunk size of a stage is fixed by whoever starts it (``layout.json``), so a
resumed run with another ``chunk_size`` setting continues the same layout. A shard ``i`` of ``n``
computes only the chunks ``c`` with ``c % n == i``, and the merged chunks equal an unsharded run.

Several processes may open the same stage at once (shards, torchrun ranks): creation is race-free
(``stage.json`` and ``layout.json`` are created exclusively, a folder is only ever cleared when its
``stage.json`` names another key).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 2  # bumped whenever what a stage stores changes meaning (2: EOS-aware rollouts, new keys)


class StaleResultError(RuntimeError):
    """A stored result was made from other inputs than the current config describes."""


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable description of a stage's inputs."""
    blob = json.dumps({"v": FORMAT_VERSION, "obj": obj}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, unknown objects strings)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def describe_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The settings that differ between two input descriptions, as ``"path: old -> new"`` lines."""
    old, new = _plain(old), _plain(new)
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{path}: (absent) -> {_short(new[k])}")
            elif k not in new:
                out.append(f"{path}: {_short(old[k])} -> (absent)")
            else:
                out += describe_changes(old[k], new[k], path)
        return out
    if old != new:
        return [f"{prefix or 'value'}: {_short(old)} -> {_short(new)}"]
    return []


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Stage:
    path: Path
    key: str
    inputs: Any = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def mark_done(self) -> None:
        atomic_write_text(self.path / "DONE", self.key + "\n")

    def chunk_path(self, index: int, suffix: str = ".safetensors") -> Path:
        return self.path / f"chunk_{index:05d}{suffix}"

    def chunk_size(self, wanted: int) -> int:
        """The stage's chunk size: the one recorded by whoever started it, else ``wanted`` (recorded now)."""
        path = self.path / "layout.json"
        if not path.exists():
            _create_exclusive(path, json.dumps({"chunk_size": int(wanted)}))
        return int(_read_json(path)["chunk_size"])


def _read_json(path: Path, attempts: int = 50) -> Any:
    """Read a JSON file that another process may be creating right now (retry briefly)."""
    for i in range(attempts):
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            if i == attempts - 1:
                raise
            time.sleep(0.05)


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists; atomic (the first of several processes wins)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text)
    try:
        os.link(tmp, path)  # fails if path exists: exclusive and atomic, also on most network file systems
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def open_stage(path: str | Path, inputs: Any) -> Stage:
    """Open (or reset) the folder of a stage for writing; ``inputs`` describes what it is made from."""
    path = Path(path)
    key = fingerprint(inputs)
    meta = path / "stage.json"
    if meta.exists():
        old = _read_json(meta).get("key")
        if old != key:
            # clear by renaming first: a concurrent reader never sees a half-deleted folder
            trash = path.with_name(f".{path.name}.old.{uuid.uuid4().hex}")
            try:
                path.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            except FileNotFoundError:
                pass  # another process cleared it already
    path.mkdir(parents=True, exist_ok=True)
    _create_exclusive(meta, json.dumps({"key": key, "inputs": _plain(inputs)}, indent=1))
    stored = _read_json(meta).get("key")
    if stored != key:
        raise RuntimeError(f"{path}: another process opened this stage with other inputs at the same time")
    return Stage(path, key, inputs)


def read_stage(path: str | Path, inputs: Any, what: str, fix: str) -> Stage:
    """Check that the finished stage at ``path`` was made from ``inputs``; never changes anything.

    Raises :class:`StaleResultError` naming the stage, the settings that changed and ``fix`` (the
    command that recomputes it), or ``RuntimeError`` when the stage is missing or unfinished."""
    path = Path(path)
    meta = path / "stage.json"
    if not meta.exists():
        raise RuntimeError(f"{path}: {what} not computed yet; {fix}")
    stored = _read_json(meta)
    key = fingerprint(inputs)
    if stored.get("key") != key:
        changes = describe_changes(stored.get("inputs", {}), inputs) or ["(the stored result predates this version)"]
        raise StaleResultError(
            f"{path}: {what} were made with other settings than the current config:\n  "
            + "\n  ".join(changes[:12]) + ("\n  ..." if len(changes) > 12 else "") + f"\nRecompute: {fix}")
    stage = Stage(path, key, inputs)
    if not stage.done:
        raise RuntimeError(f"{path}: {what} are not finished (some chunks or shards are missing); {fix}")
    return stage


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (a crash leaves either the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    tmp.replace(path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write safetensors atomically (a crash leaves either the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def shard_chunks(n_items: int, chunk_size: int, shard: tuple[int, int] = (0, 1)) -> list[tuple[int, int, int]]:
    """The chunks ``(index, start, stop)`` of ``n_items`` that shard ``i`` of ``n`` computes."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
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
