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

Integrity: what a stage keeps is checked when it is read. A finished stage records the size and
checksum of each file it keeps in ``integrity.json`` (written just before ``DONE``); safetensors files
carry a SHA-256 and the shape of each tensor in their own metadata; rollout chunks end with a line
holding their row count and checksum. A reader that finds a file that does not match raises
:class:`IntegrityError` naming the file and what is wrong; a writer opening a finished stage checks
every recorded file and, when one does not match, removes it (and ``DONE``), so the stage recomputes
exactly that piece. A stage finished before nice_kit recorded checksums (no ``integrity.json``) is
reused after the checks that need no record (sizes, shapes, unit rows) and gets its checksums then.
A write that runs out of disk space raises :class:`DiskFullError` naming the stage and the folder and
leaves no half-written file that looks finished.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm.auto import tqdm

FORMAT_VERSION = 2  # bumped whenever what a stage stores changes meaning (2: EOS-aware rollouts, new keys)


class StaleResultError(RuntimeError):
    """A stored result was made from other inputs than the current config describes."""


class IntegrityError(RuntimeError):
    """A stored file does not hold what was recorded when it was written (truncated, corrupted, missing)."""

    def __init__(self, path: str | Path, problem: str, fix: str | None = None):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}" + (f"; {fix}" if fix else
                         "; the next run of this stage (nice-kit run, or the stage's command) recomputes it"))


class DiskFullError(OSError):
    """A write ran out of disk space; the message names the stage and the folder."""


INTEGRITY_FILE = "integrity.json"
SUM_BLOCK_BYTES = 1 << 20  # vectors.npy is checked in blocks of about this many bytes (whole rows)
# time spent in checks (seconds, this process): bench/bench_scoring.py and the tests read it
CHECK_SECONDS = {"total": 0.0}
_CHECK_DEPTH = [0]


@contextmanager
def timed_check() -> Iterator[None]:
    """Count the time inside in :data:`CHECK_SECONDS` (nested uses count once)."""
    _CHECK_DEPTH[0] += 1
    t = time.perf_counter()
    try:
        yield
    finally:
        _CHECK_DEPTH[0] -= 1
        if _CHECK_DEPTH[0] == 0:
            CHECK_SECONDS["total"] += time.perf_counter() - t


def log(msg: str) -> None:
    tqdm.write(f"[nice_kit] {msg}")


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sum64(data: bytes | memoryview) -> str:
    """A fast checksum of ``data`` (the sum of its little-endian 64-bit words, mod 2**64, with its
    length): any changed word, truncation or zeroed page changes it (a deliberate forgery need not).
    It runs at memory speed, so the vector store can be checked as it is read."""
    n = len(data)
    pad = (-n) % 8
    if pad:
        data = bytes(data) + b"\0" * pad
    total = int(np.frombuffer(data, dtype="<u8").sum(dtype=np.uint64)) if n else 0
    return f"{n:x}:{total:016x}"


def file_record(path: Path) -> dict[str, Any]:
    """What ``integrity.json`` keeps of a file: its size and SHA-256."""
    with timed_check():
        return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


READER_DEEP_BYTES = 256 << 20  # readers check the contents of recorded files up to this size (larger: as read)
_VERIFIED: set[tuple] = set()  # files whose contents matched, by (path, size, mtime, record): checked once


def check_file(path: Path, record: dict[str, Any], deep: bool | int = True) -> str | None:
    """What is wrong with ``path`` against its record (``None`` when it matches). ``deep=False``
    checks only that it exists with its recorded size; ``deep=N`` checks the contents of files of at
    most N bytes. Block records (vectors.npy) are checked by :func:`check_vectors_file`.
    A file found sound is not read again in this process while its size and mtime are unchanged."""
    with timed_check():
        if not path.is_file():
            return "missing"
        stat = path.stat()
        size = stat.st_size
        if "bytes" in record and size != record["bytes"]:
            return (f"{size:,} bytes, but {record['bytes']:,} were written"
                    + (" (truncated)" if size < record["bytes"] else ""))
        if deep is not True and (deep is False or size > deep):
            return None
        seen = (str(path), size, stat.st_mtime_ns, record.get("sha256") or str(record.get("blocks", ""))[:64])
        if seen in _VERIFIED:
            return None
        if "sha256" in record and sha256_file(path) != record["sha256"]:
            return "its bytes changed after it was written (SHA-256 differs from the one recorded)"
        if "blocks" in record:
            problem = check_vectors_file(path, record)
            if problem:
                return problem
        _VERIFIED.add(seen)
    return None


STORE_DTYPE = np.float16  # the stored vectors' dtype (nice_kit.vectors writes them)


def check_vectors_file(path: Path, record: dict) -> str | None:
    """What is wrong with a whole ``vectors.npy`` against its record (header, size, every block)."""
    try:
        shape, offset = npy_header(path)
    except (IntegrityError, ValueError, OSError) as err:
        return str(getattr(err, "problem", err))
    if list(shape) != list(record["shape"]) or offset != record["offset"]:
        return f"header says shape {list(shape)}, {record['shape']} was written"
    n, d = shape
    rows, row_bytes = int(record["block_rows"]), d * np.dtype(STORE_DTYPE).itemsize
    with timed_check(), open(path, "rb") as f:
        f.seek(offset)
        for k, want in enumerate(record["blocks"]):
            if sum64(f.read(rows * row_bytes)) != want:
                return (f"rows {k * rows}-{min(n, (k + 1) * rows) - 1} changed after they were written "
                        "(checksum differs)")
    return None


def npy_header(path: Path) -> tuple[tuple[int, int], int]:
    """(shape, offset) of a float16 C-order 2-D ``.npy`` file; raises IntegrityError otherwise."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except FileNotFoundError:
        raise IntegrityError(path, "missing") from None
    except (ValueError, OSError, SyntaxError) as err:
        raise IntegrityError(path, f"unreadable .npy header ({err}): corrupted") from None
    if fortran or np.dtype(dtype) != np.dtype(STORE_DTYPE) or len(shape) != 2:
        raise IntegrityError(path, "not a C-order float16 matrix")
    return tuple(int(x) for x in shape), offset


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left" in text or "StorageFull" in text or "Disk quota exceeded" in text


def stage_label(path: Path) -> str:
    """The stage a path belongs to: the nearest folder holding ``stage.json`` (else the path's folder)."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if (parent / "stage.json").is_file():
            return str(parent)
    return str(path.parent)


def disk_full(path: Path, err: BaseException, what: str | None = None) -> DiskFullError:
    """The error to raise when writing ``path`` ran out of space: names the stage and the folder."""
    folder = Path(path).parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(errno.ENOSPC, f"no space left on device while writing {what or Path(path).name} "
                         f"(stage {stage_label(path)}, folder {folder}, {free}); nothing half-written was kept: "
                         "free some space and run the same command again (finished pieces are reused)")


@contextmanager
def writing(path: Path, tmp: Path | None = None, what: str | None = None) -> Iterator[None]:
    """Around a write of ``path`` (through ``tmp``): on any failure ``tmp`` is removed; running out of
    disk space raises :class:`DiskFullError` naming the stage and the folder."""
    try:
        yield
    except BaseException as err:
        if tmp is not None:
            if Path(tmp).is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and _is_disk_full(err):
            raise disk_full(path, err, what) from err
        raise


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
    # the content this stage is computed from beyond its key (the warmup checkpoint's checksums), recorded
    # in integrity.json when it finishes and compared when it is opened or read
    made_from: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return (self.path / "DONE").exists()

    def mark_done(self, files: dict[str, dict[str, Any]] | list[str] | None = None) -> None:
        """Mark the stage finished, first recording the size and checksum of the ``files`` it keeps
        (names relative to the stage folder, or ``{name: record}`` made by the writer)."""
        if files is not None:
            records = files if isinstance(files, dict) else {n: file_record(self.path / n) for n in files}
            manifest = {"files": records, **({"made_from": self.made_from} if self.made_from else {})}
            atomic_write_text(self.path / INTEGRITY_FILE, json.dumps(manifest, indent=1))
        atomic_write_text(self.path / "DONE", self.key + "\n")

    def recorded_made_from(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / INTEGRITY_FILE).read_text()).get("made_from")
        except (OSError, ValueError, AttributeError):
            return None

    def made_from_other(self, current: dict[str, Any] | None) -> bool:
        """Whether the finished stage was computed from other content (a warmup checkpoint recomputed
        with other bytes since) than ``current``; unknown (not recorded) counts as the same."""
        recorded = self.recorded_made_from()
        return bool(self.done and recorded and current and recorded != current)

    def check_made_from(self, current: dict[str, Any] | None, what: str, fix: str) -> None:
        """Reader side: :class:`StaleResultError` when the stage was computed from other content."""
        if self.made_from_other(current):
            changes = describe_changes(self.recorded_made_from(), current)
            raise StaleResultError(f"{self.path}: {what} were made from another warmup checkpoint than the one on "
                                   "disk now (it was recomputed since):\n  " + "\n  ".join(changes)
                                   + f"\nRecompute: {fix}")

    def restart_if_made_from_other(self, current: dict[str, Any] | None) -> None:
        """Writer side: a finished stage computed from other content is computed again, chunks included."""
        self.made_from = current
        if not self.made_from_other(current):
            return
        log(f"{self.path}: made from another warmup checkpoint than the one on disk now -- recomputing it")
        for name in ("DONE", INTEGRITY_FILE, "vectors.npy", "extras.npz", "samples.jsonl", "sampling.json"):
            (self.path / name).unlink(missing_ok=True)
        for pattern in ("chunk_*", "rewards_*.json"):
            for f in self.path.glob(pattern):
                f.unlink(missing_ok=True)

    def records(self) -> dict[str, dict[str, Any]] | None:
        """The files recorded when the stage finished (``None``: it finished before checksums were kept)."""
        path = self.path / INTEGRITY_FILE
        if not path.exists():
            return None
        try:
            return dict(json.loads(path.read_text())["files"])
        except (ValueError, KeyError, TypeError):
            return {INTEGRITY_FILE: {"bytes": -1}}  # unreadable: reported as a problem of that file

    def problems(self, deep: bool | int = True) -> dict[str, str]:
        """What is wrong with the finished stage's recorded files, by name (empty when all match)."""
        records = self.records()
        if records is None:
            return {}
        if INTEGRITY_FILE in records:
            return {INTEGRITY_FILE: "unreadable"}
        out = {}
        for name, rec in records.items():
            problem = check_file(self.path / name, rec, deep)
            if problem:
                out[name] = problem
        return out

    def check(self, deep: bool | int = False, fix: str | None = None) -> None:
        """Raise :class:`IntegrityError` for the first recorded file that does not match."""
        for name, problem in self.problems(deep).items():
            raise IntegrityError(self.path / name, problem, fix)

    def repair(self) -> list[str]:
        """Writer side: check every recorded file of a finished stage; remove those that do not match
        (and ``DONE``, ``integrity.json``) so that the stage recomputes exactly them. Returns the problems."""
        if not self.done:
            return []
        bad = self.problems(deep=True)
        if not bad:
            return []
        lines = [f"{self.path / n}: {p}" for n, p in bad.items()]
        log("integrity: " + "; ".join(lines) + " -- recomputing " + ", ".join(sorted(bad)))
        (self.path / "DONE").unlink(missing_ok=True)
        (self.path / INTEGRITY_FILE).unlink(missing_ok=True)
        for name in bad:
            (self.path / name).unlink(missing_ok=True)
        return lines

    def chunk_path(self, index: int, suffix: str = ".safetensors") -> Path:
        return self.path / f"chunk_{index:05d}{suffix}"

    def chunk_size(self, wanted: int) -> int:
        """The stage's chunk size: the one recorded by whoever started it, else ``wanted`` (recorded now)."""
        path = self.path / "layout.json"
        if not path.exists():
            _create_exclusive(path, json.dumps({"chunk_size": int(wanted)}))
        try:
            size = int(_read_json(path, attempts=5)["chunk_size"])
            if size < 1:
                raise ValueError(size)
            return size
        except (ValueError, KeyError, TypeError):
            # the chunks' layout is unknown: they cannot be trusted to fit together, so they are redone
            chunks = sorted(self.path.glob("chunk_*"))
            log(f"integrity: {path}: unreadable -- recomputing this stage's {len(chunks)} chunk(s)")
            for chunk in chunks:
                chunk.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
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
        try:
            old = _read_json(meta, attempts=5).get("key")
        except (ValueError, AttributeError):
            log(f"integrity: {meta}: unreadable -- recomputing this stage")
            old = None
        if old != key:
            # clear by renaming first: a concurrent reader never sees a half-deleted folder
            trash = path.with_name(f".{path.name}.old.{uuid.uuid4().hex}")
            try:
                path.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            except FileNotFoundError:
                pass  # another process cleared it already
    path.mkdir(parents=True, exist_ok=True)
    with writing(meta, None, "stage.json"):
        _create_exclusive(meta, json.dumps({"key": key, "inputs": _plain(inputs)}, indent=1))
    stored = _read_json(meta).get("key")
    if stored != key:
        raise RuntimeError(f"{path}: another process opened this stage with other inputs at the same time")
    stage = Stage(path, key, inputs)
    stage.repair()  # a finished stage whose recorded files no longer match recomputes them
    return stage


def read_stage(path: str | Path, inputs: Any, what: str, fix: str) -> Stage:
    """Check that the finished stage at ``path`` was made from ``inputs``; never changes anything.

    Raises :class:`StaleResultError` naming the stage, the settings that changed and ``fix`` (the
    command that recomputes it), or ``RuntimeError`` when the stage is missing or unfinished."""
    path = Path(path)
    meta = path / "stage.json"
    if not meta.exists():
        raise RuntimeError(f"{path}: {what} not computed yet; {fix}")
    try:
        stored = _read_json(meta, attempts=5)
        stored.get("key")
    except (ValueError, AttributeError):
        raise IntegrityError(meta, "unreadable: corrupted", f"{fix} recomputes {what}") from None
    key = fingerprint(inputs)
    if stored.get("key") != key:
        changes = describe_changes(stored.get("inputs", {}), inputs) or ["(the stored result predates this version)"]
        raise StaleResultError(
            f"{path}: {what} were made with other settings than the current config:\n  "
            + "\n  ".join(changes[:12]) + ("\n  ..." if len(changes) > 12 else "") + f"\nRecompute: {fix}")
    stage = Stage(path, key, inputs)
    if not stage.done:
        raise RuntimeError(f"{path}: {what} are not finished (some chunks or shards are missing); {fix}")
    # sizes, and the contents of files up to READER_DEEP_BYTES (larger ones are checked as they are read)
    stage.check(deep=READER_DEEP_BYTES, fix=f"{what} are damaged; {fix} recomputes them")
    return stage


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (a crash leaves either the old file or the new one); out of disk
    space: :class:`DiskFullError`, and nothing left behind."""
    tmp = tmp_path_for(path)
    with writing(path, tmp):
        tmp.write_text(text)
        tmp.replace(path)


def _tensor_sha(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return sha256_bytes(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write safetensors atomically (a crash leaves either the old file or the new one), with each
    tensor's SHA-256 and shape in the file's metadata (checked by :func:`load_tensors`)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata or {})
    with timed_check():  # one metadata entry: safetensors writes several in no fixed order (bytes would vary)
        meta[TENSORS_META] = json.dumps({k: {"sha256": _tensor_sha(v), "shape": list(v.shape)}
                                         for k, v in tensors.items()}, sort_keys=True)
    tmp = tmp_path_for(path)
    with writing(path, tmp):
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)


TENSORS_META = "nice_kit.integrity"


def tensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file written by :func:`save_tensors` (``None``: it is sound)."""
    try:
        load_tensors(path)
    except IntegrityError as err:
        return err.problem
    return None


def load_tensors(path: Path, check: bool = True) -> dict[str, torch.Tensor]:
    """Read a safetensors file; its tensors are checked against the SHA-256 and shape recorded when it
    was written (files written before nice_kit recorded them are read as they are). A truncated,
    corrupted or missing file raises :class:`IntegrityError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(path, "missing")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise IntegrityError(path, f"not a readable safetensors file ({type(err).__name__}: {err}): truncated or "
                             "corrupted") from None
    if check and TENSORS_META in meta:  # files written before nice_kit recorded checksums are read as they are
        with timed_check():
            try:
                written = json.loads(meta[TENSORS_META])
            except ValueError:
                raise IntegrityError(path, "its checksum record is corrupted") from None
            missing = sorted(set(written) - set(tensors))
            if missing:
                raise IntegrityError(path, f"tensors {missing} were written but are missing")
            for k, v in tensors.items():
                rec = written.get(k)
                if rec is None:
                    raise IntegrityError(path, f"tensor {k!r} was not written by nice_kit")
                if rec["shape"] != list(v.shape):
                    raise IntegrityError(path, f"tensor {k!r} has shape {list(v.shape)}, {rec['shape']} was written")
                if _tensor_sha(v) != rec["sha256"]:
                    raise IntegrityError(path, f"tensor {k!r} changed after it was written (SHA-256 differs "
                                         "from the one recorded in the file)")
    return tensors


# ---- JSONL rows with a checksum line (rollout chunks)
ROWS_TRAILER = "nice_kit_rows"


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write JSONL rows atomically, ending with a line holding their count and SHA-256."""
    body = "".join(json.dumps(r) + "\n" for r in rows)
    trailer = json.dumps({ROWS_TRAILER: len(rows), "sha256": sha256_bytes(body.encode())})
    atomic_write_text(path, body + trailer + "\n")


def read_rows(path: Path, expected: int | None = None) -> list[str]:
    """The JSON lines written by :func:`write_rows`, checked against their count and checksum (a file
    without the checksum line, written before nice_kit kept one, is checked line by line).
    Raises :class:`IntegrityError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(path, "missing")
    with timed_check():
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise IntegrityError(path, "not valid UTF-8: corrupted") from None
        lines = text.splitlines()
        trailer = None
        if lines and lines[-1].startswith("{\"" + ROWS_TRAILER):
            try:
                trailer = json.loads(lines[-1])
            except ValueError:
                raise IntegrityError(path, "its checksum line is corrupted") from None
            lines = lines[:-1]
            body = "".join(line + "\n" for line in lines)
            if trailer.get(ROWS_TRAILER) != len(lines):
                raise IntegrityError(path, f"{len(lines)} rows, {trailer.get(ROWS_TRAILER)} were written")
            if sha256_bytes(body.encode()) != trailer.get("sha256"):
                raise IntegrityError(path, "its rows changed after they were written (SHA-256 differs)")
        elif not text.endswith("\n") and text:
            raise IntegrityError(path, "ends in the middle of a line: truncated")
        for i, line in enumerate(lines):
            try:
                json.loads(line)
            except ValueError:
                raise IntegrityError(path, f"line {i + 1} is not valid JSON: corrupted or truncated") from None
        if expected is not None and len(lines) != expected:
            raise IntegrityError(path, f"{len(lines)} rows, expected {expected}")
    return lines


def rows_problem(path: Path, expected: int | None = None) -> str | None:
    """What is wrong with a rows file (``None``: it is sound)."""
    try:
        read_rows(path, expected)
    except IntegrityError as err:
        return err.problem
    return None


def drop_if_damaged(path: Path, problem: str | None) -> bool:
    """Writer side of a per-item stage: remove a damaged chunk (logging why) so it is recomputed.
    Returns whether the chunk is usable."""
    if problem is None:
        return True
    if path.exists():
        log(f"integrity: {path}: {problem} -- recomputing this chunk")
        path.unlink(missing_ok=True)
    return False


# ---- JSON values with their checksum (reward caches)
def write_checked_json(path: Path, value: Any, **about: Any) -> None:
    """Write ``value`` as JSON with its SHA-256 (and the ``about`` fields, e.g. what it was made from)."""
    blob = json.dumps(value, sort_keys=True)
    atomic_write_text(path, json.dumps({**about, "sha256": sha256_bytes(blob.encode()), "value": value}))


def read_checked_json(path: Path) -> tuple[Any, dict[str, Any]]:
    """``(value, about)`` written by :func:`write_checked_json`; a plain JSON file (written before
    checksums were kept) reads as ``(value, {})``. Raises :class:`IntegrityError` naming the file."""
    with timed_check():
        try:
            obj = json.loads(Path(path).read_text())
        except (ValueError, UnicodeDecodeError):
            raise IntegrityError(path, "not valid JSON: truncated or corrupted") from None
        if not (isinstance(obj, dict) and "sha256" in obj and "value" in obj):
            return obj, {}
        value = obj.pop("value")
        if sha256_bytes(json.dumps(value, sort_keys=True).encode()) != obj["sha256"]:
            raise IntegrityError(path, "its contents changed after they were written (SHA-256 differs)")
        return value, obj


# ---- table rows with a checksum column (evaluation results)
ROW_CHECK = "check"


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "nan"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, float, np.integer, np.floating)):
        f = float(v)
        return "nan" if f != f else repr(f)
    return str(v)


def row_check(row: dict[str, Any]) -> str:
    """The checksum of a table row (every column but ``check``; numbers compared as floats and empty
    cells left out, so a row reads back from CSV with the same checksum)."""
    cells = sorted((str(k), _cell(v)) for k, v in row.items() if k != ROW_CHECK and _cell(v) != "nan")
    return sha256_bytes(json.dumps(cells).encode())[:16]


def checked_rows(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """The rows of a table read from ``path`` whose checksum matches; rows that do not are dropped
    with a log line naming the file (so they are recomputed). Rows without a checksum (written
    before nice_kit kept one) are kept."""
    good, bad = [], []
    with timed_check():
        for i, r in enumerate(rows):
            c = r.get(ROW_CHECK)
            if c is None or (isinstance(c, float) and c != c) or str(c) == row_check(r):
                good.append(r)
            else:
                bad.append(i)
    if bad:
        log(f"integrity: {path}: row(s) {bad} changed after they were written -- recomputing them")
    return good


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
