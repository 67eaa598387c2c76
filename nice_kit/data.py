"""Records (one format for pools and target tasks, read from JSONL, Parquet or a ``datasets`` folder)
and their tokenisation.

A record is a JSON object (a JSONL line, or a table row) with a stable ``id`` and either

* ``messages``: a chat, ``[{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]``;
  the last assistant message is the response, everything before it the prompt (ShareGPT's
  ``{"from": "human"/"gpt", "value": ...}`` messages are read too); or
* ``prompt`` (and, except for label-free target prompts, ``response``).

Any other column (``task``, ``answer``, ``tests``, diagnostic flags ...) is kept untouched in
``Record.columns``: metrics read them, selectors never do. A column mapping (``data.columns`` in a
config, e.g. ``{prompt = "instruction", response = "output", id = "idx"}``) renames the user's
columns to these names as the records are read.

Every error names the file and the line (JSONL, counted from 1) or the row (tables, counted from 0
as pandas and ``datasets`` index them).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

IGNORE_INDEX = -100
RECORD_FIELDS = ("id", "prompt", "response", "messages")


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass
class Record:
    id: str
    messages: list[dict[str, str]]  # the prompt as a chat (ends with a user turn)
    response: str | None  # reference response (None for label-free target prompts)
    columns: dict[str, Any] = field(default_factory=dict)
    # where the record was read: "file:line" or "file: row n" (not part of its data, never saved)
    origin: str | None = field(default=None, compare=False, repr=False)
    line: int | None = field(default=None, compare=False, repr=False)  # JSONL line (from 1) or table row (from 0)

    @property
    def prompt(self) -> str:
        """The last user message (what a person would call the prompt)."""
        return self.messages[-1]["content"]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.response is not None:
            out["messages"] = self.messages + [{"role": "assistant", "content": self.response}]
        else:
            out["messages"] = self.messages
        out.update(self.columns)
        return out


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def _message(m: Any) -> Any:
    """A chat message as {role, content}: ShareGPT's {from, value} converted, null fields (tables) dropped."""
    if not isinstance(m, dict):
        return m
    m = {k: v for k, v in m.items() if v is not None}
    if "role" not in m and "content" not in m and "from" in m and "value" in m:
        rest = {k: v for k, v in m.items() if k not in ("from", "value")}
        return {"role": _SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"], **rest}
    return m


_MAPPING_HINT = ("map your column names with data.columns, e.g. [data] columns = {prompt = \"instruction\", "
                 "response = \"output\", id = \"idx\"}")


def _parse_record(obj: Any, where: str, require_response: bool, original: dict | None = None) -> Record:
    """One record from a row (``original``: the row before the column mapping renamed it, as error
    messages list its columns)."""
    def _columns_found(row: dict) -> str:
        return f"the row has columns {sorted(original if original is not None else row)}"

    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise DataError(f"{where}: missing field 'id'; {_columns_found(obj)}; {_MAPPING_HINT}")
    rid = obj["id"]
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid).strip() == "":
        raise DataError(f"{where}: 'id' must be a non-empty string or integer, got {rid!r}")
    rid = str(rid)
    columns = {k: v for k, v in obj.items() if k not in ("id", "messages", "prompt", "response")}
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where} (id {rid}): 'messages' must be a non-empty list of {{role, content}} objects")
        msgs = [_message(m) for m in msgs]
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where} (id {rid}): messages[{i}] must be an object with string 'role' and 'content'")
        if msgs[-1]["role"] == "assistant":
            prompt_msgs, response = [dict(m) for m in msgs[:-1]], msgs[-1]["content"]
        else:
            prompt_msgs, response = [dict(m) for m in msgs], None
        if not prompt_msgs or prompt_msgs[-1]["role"] != "user":
            raise DataError(f"{where} (id {rid}): the message before the response must be a 'user' message")
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise DataError(f"{where} (id {rid}): 'prompt' must be a non-empty string")
        prompt_msgs = [{"role": "user", "content": obj["prompt"]}]
        response = obj.get("response")
        if response is not None and not isinstance(response, str):
            raise DataError(f"{where} (id {rid}): 'response' must be a string, got {type(response).__name__}")
    else:
        raise DataError(f"{where} (id {rid}): needs either 'messages' or 'prompt' (and 'response'); "
                        f"{_columns_found(obj)}; {_MAPPING_HINT}")
    if response is not None and not response.strip():
        raise DataError(f"{where} (id {rid}): the response is empty")
    if require_response and response is None:
        raise DataError(f"{where} (id {rid}): missing the response ('response' field or a final assistant message); "
                        f"{_columns_found(obj)}; {_MAPPING_HINT}")
    return Record(rid, prompt_msgs, response, columns)


def load_records(path: str | Path, require_response: bool = True,
                 columns: dict[str, str] | None = None) -> list[Record]:
    """Read records from a JSONL file, a Parquet file (``.parquet``) or a folder saved by
    ``datasets.Dataset.save_to_disk``, checking every record; errors name the file and line or row.

    ``columns`` maps nice_kit's names to the file's (``{"prompt": "instruction", "id": "idx"}``):
    each mapped column is renamed as the records are read. A mapped column that the file does not
    have is an error naming the file, the mapping and the columns the file has.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    mapping = _check_mapping(columns, path)
    if path.is_dir():
        rows = _dataset_folder_rows(path)
    elif path.suffix.lower() in (".parquet", ".pq"):
        rows = _parquet_rows(path)
    else:
        rows = _jsonl_rows(path)
    records: list[Record] = []
    seen: dict[str, str] = {}
    found: set[str] = set()  # every column of the file (before renaming)
    schema = _table_columns(path) if mapping else None
    if schema is not None:  # a table: its columns are known before any row is read
        _check_mapped_columns(path, mapping, schema)
    for where, position, number, obj in rows:
        if isinstance(obj, dict):
            found.update(obj)
        original = obj
        if mapping:
            obj = _rename(obj, mapping, where)
        rec = _parse_record(obj, where, require_response, original if isinstance(original, dict) else None)
        if rec.id in seen:
            raise DataError(f"{where}: duplicate id {rec.id!r} (first seen {seen[rec.id]})")
        seen[rec.id] = position
        rec.origin, rec.line = where, number
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    if mapping:
        _check_mapped_columns(path, mapping, found)
    return records


def _check_mapped_columns(path: Path, mapping: dict[str, str], columns: Iterable[str]) -> None:
    """A column the mapping names that the file lacks (a table's schema, or no JSONL row) is an error."""
    columns = set(columns)
    absent = {ours: theirs for ours, theirs in mapping.items() if theirs not in columns}
    if absent:
        which = ", ".join(f"{ours} = {theirs!r}" for ours, theirs in absent.items())
        raise DataError(f"{path}: the column mapping data.columns = {mapping} names column(s) the file does not have "
                        f"({which}); the file has columns {sorted(columns)}")


def _table_columns(path: Path) -> list[str] | None:
    """The column names of a Parquet file or a ``datasets`` folder (``None`` for JSONL)."""
    try:
        if path.is_dir():
            pa = _pyarrow()
            folder = path
            if (path / "dataset_dict.json").is_file():
                splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
                folder = path / splits[0]
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            arrow = folder / state["_data_files"][0]["filename"]
            with pa.memory_map(str(arrow)) as source:
                try:
                    return list(pa.ipc.open_stream(source).schema.names)
                except pa.ArrowInvalid:
                    source.seek(0)
                    return list(pa.ipc.open_file(source).schema.names)
        if path.suffix.lower() in (".parquet", ".pq"):
            return list(_pyarrow().parquet.ParquetFile(path).schema_arrow.names)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None  # unreadable: the row reader reports it, naming the file
    return None


def _check_mapping(columns: dict[str, str] | None, path: Path) -> dict[str, str]:
    if not columns:
        return {}
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                                for k, v in columns.items()):
        raise DataError(f"{path}: the column mapping must map names to non-empty column names, got {columns!r}")
    sources = list(columns.values())
    if len(set(sources)) != len(sources):
        raise DataError(f"{path}: the column mapping {columns} reads one column twice")
    return dict(columns)


def _rename(obj: Any, mapping: dict[str, str], where: str) -> Any:
    """Rename the mapped columns of one row (``mapping``: nice_kit's name -> the file's name)."""
    if not isinstance(obj, dict):
        return obj
    out = dict(obj)
    moved = {ours: out.pop(theirs) for ours, theirs in mapping.items() if theirs in out}
    for ours in moved:
        if ours in out:  # the row has both the mapped column and one already called ours
            raise DataError(f"{where}: the column mapping reads {mapping[ours]!r} as {ours!r}, but the row also has a "
                            f"column {ours!r}; map it elsewhere or drop one")
    out.update(moved)
    needed = ["id"] if "messages" in out else ["id", "prompt"]
    missing = [f"{mapping[ours]!r} (read as {ours!r})" for ours in needed if ours in mapping and ours not in out]
    if missing:
        raise DataError(f"{where}: no column {', '.join(missing)} named in the column mapping data.columns = "
                        f"{mapping}; the row has {sorted(obj)}")
    return out


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj: Any) -> str | None:
    """The first string in ``obj`` that UTF-8 cannot encode (a lone surrogate such as \\ud800), else None."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as err:
                return x[max(0, err.start - 10): err.end + 10]
        elif isinstance(x, dict):
            stack += list(x.keys()) + list(x.values())
        elif isinstance(x, list):
            stack += x
    return None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, str, int, Any]]:
    """(where, position, line, object) per non-blank line of a JSONL file (a UTF-8 BOM is allowed)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the "
                                "line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            if _SURROGATE_ESCAPE.search(raw):
                bad = _lone_surrogate(obj)
                if bad is not None:
                    raise DataError(f"{where}: a string holds a lone UTF-16 surrogate (an escape such as \\ud800 "
                                    f"without its pair), which is not a character: {bad!r}")
            yield where, f"on line {lineno}", lineno, obj


def _table_rows(path: Path, label: Path, batches) -> Iterator[tuple[str, str, int, Any]]:
    row = 0
    for batch in batches:
        for obj in batch.to_pylist():
            # a null cell is a missing column (tables give every row every column)
            obj = {k: v for k, v in obj.items() if v is not None}
            yield f"{label}: row {row}", f"in row {row}", row, obj
            row += 1


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("reading Parquet or a datasets folder needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _parquet_rows(path: Path) -> Iterator[tuple[str, str, int, Any]]:
    pa = _pyarrow()
    try:
        batches = pa.parquet.ParquetFile(path).iter_batches(batch_size=4096)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    yield from _table_rows(path, path, batches)


def _dataset_folder_rows(path: Path) -> Iterator[tuple[str, str, int, Any]]:
    """Rows of a folder written by ``datasets.Dataset.save_to_disk`` (Arrow stream files listed in
    state.json), read with pyarrow alone; a ``DatasetDict`` folder with one split is read as that split."""
    pa = _pyarrow()
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        if len(splits) != 1:
            raise DataError(f"{path}: a saved DatasetDict with splits {splits}; give the folder of one split, "
                            f"e.g. {path / (splits[0] if splits else 'train')}")
        path = path / splits[0]
    state_file = path / "state.json"
    if not state_file.is_file():
        raise DataError(f"{path}: a folder, but not one saved by datasets' save_to_disk (no state.json); give a "
                        ".jsonl or .parquet file, or such a folder")
    try:
        files = [entry["filename"] for entry in json.loads(state_file.read_text(encoding="utf-8"))["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{state_file}: unreadable dataset state ({err!r})") from None

    def batches():
        for name in files:
            arrow = path / name
            if not arrow.is_file():
                raise DataError(f"{arrow}: listed in {state_file} but missing")
            try:
                with pa.memory_map(str(arrow)) as source:
                    try:
                        reader = pa.ipc.open_stream(source)
                    except pa.ArrowInvalid:  # written in the Arrow file format instead
                        source.seek(0)
                        reader = pa.ipc.open_file(source)
                        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
                        continue
                    yield from reader
            except pa.ArrowException as err:
                raise DataError(f"{arrow}: not a readable Arrow file ({err})") from None

    yield from _table_rows(path, path, batches())


def model_context(config: Any) -> int | None:
    """The longest sequence a model takes, from its config (a ``PretrainedConfig`` or a config.json
    dict): ``max_position_embeddings`` or its other names; ``None`` when the config does not say."""
    cfg = config if isinstance(config, dict) else getattr(config, "to_dict", lambda: {})()
    for c in (cfg, cfg.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            if isinstance(c.get(key), int) and c[key] > 0:
                return int(c[key])
    return None


def check_max_length(max_length: int, context: int | None, model: str, longest: int | None = None) -> str | None:
    """``data.max_length`` beyond the model's context: an error (:class:`DataError`) when a sequence of
    the data (``longest`` tokens after truncation) would pass the context, else the warning to give
    (positions past the context are untrained or fail); ``None`` when max_length fits."""
    if context is None or max_length <= context:
        return None
    head = (f"[data] max_length = {max_length} is beyond the context of model {model!r} ({context} tokens, its "
            "max_position_embeddings)")
    if longest is None or longest > context:
        raise DataError(f"{head}: " + (f"a sequence of this data has {longest} tokens, " if longest else "")
                        + f"and sequences longer than {context} tokens fail or are silently wrong; set [data] "
                        f"max_length to at most {context}")
    return (f"{head}; the longest sequence of this data has {longest} tokens, so nothing is affected now, but a "
            f"longer one would fail or be silently wrong: set [data] max_length to at most {context}")


def pool_size_warnings(n_pool: int, warmup_fraction: float, selection_fraction: float) -> list[str]:
    """What a small pool does to the warmup and the selection, as sentences (empty when nothing)."""
    out = []
    n_warm = int(round(warmup_fraction * n_pool))
    if n_warm < 1:
        out.append(f"warmup.fraction = {warmup_fraction} of a {n_pool}-example pool is {warmup_fraction * n_pool:.2f} "
                   "examples: the warmup trains on 1 example (the least it takes)")
    n_sel = int(round(selection_fraction * n_pool))
    if n_pool < 2:
        out.append(f"the pool has {n_pool} example: any selection is the whole pool, and the scores rank nothing")
    elif n_sel < 1:
        out.append(f"selection.fraction = {selection_fraction} of a {n_pool}-example pool is "
                   f"{selection_fraction * n_pool:.2f} examples: 1 example (the top-scored) is selected")
    elif n_sel >= n_pool:
        out.append(f"selection.fraction = {selection_fraction} of a {n_pool}-example pool selects all {n_pool}: "
                   "the selection is the whole pool")
    return out


def save_records(records: Iterable[Record], path: str | Path) -> None:
    from .runs import writing  # (nice_kit.runs imports nothing of this module)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with writing(path, tmp):  # a full disk: DiskFullError naming the folder, no half-written file left
        with tmp.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r.to_json(), ensure_ascii=False, default=str) + "\n")  # str: dates from tables
        tmp.replace(path)


def file_digest(path: str | Path) -> str:
    """A short digest of a file's bytes, or of a folder's files (names and bytes, in name order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    truncated: bool

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat prompt, ending with the assistant header (generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def tokenize_pair(tokenizer, messages: list[dict[str, str]], response: str, max_length: int) -> Tokenized:
    """Prompt (chat template, masked out of the loss) + response + end-of-turn token.

    When too long, the prompt is cut from the left first (the response is what the loss is on);
    if the response alone is longer than ``max_length`` it is cut at the right.
    """
    p = prompt_ids(tokenizer, messages)
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    truncated = False
    if len(p) + len(r) > max_length:
        truncated = True
        if len(r) >= max_length - 1:
            r = r[: max_length - 1]
            p = p[-1:]
        else:
            p = p[-(max_length - len(r)):]
    return Tokenized(p + r, [IGNORE_INDEX] * len(p) + r, truncated)


def tokenize_records(tokenizer, records: list[Record], max_length: int) -> tuple[list[Tokenized], int]:
    """Tokenise records that have responses; returns the results and how many were truncated."""
    out = []
    for rec in records:
        if rec.response is None:
            raise DataError(f"{rec.origin + ': ' if rec.origin else ''}record {rec.id!r} has no response to tokenise")
        out.append(tokenize_pair(tokenizer, rec.messages, rec.response, max_length))
    return out, sum(t.truncated for t in out)


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE_INDEX on padding)."""
    n = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, t in enumerate(items):
        ids[i, : len(t.input_ids)] = torch.tensor(t.input_ids)
        labels[i, : len(t.labels)] = torch.tensor(t.labels)
        mask[i, : len(t.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def write_slice(folder: Path, sources: dict[str, str | Path], n_pool: int, n_val: int, n_test: int,
                subtask_column: str = "task") -> dict[str, str]:
    """A small slice of a benchmark written to ``folder`` (for fast modes and benchmarks): the first
    ``n_pool`` records of ``sources["pool"]`` and the first ``n_val`` / ``n_test`` target records of each
    subtask of ``sources["target_val"]`` / ``sources["target_test"]``. Returns the written paths by name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, n in (("pool", n_pool), ("target_val", n_val), ("target_test", n_test)):
        records = load_records(sources[name], require_response=True)
        if name == "pool":
            part = records[:n]
        else:  # n of each subtask
            tasks = sorted({r.columns.get(subtask_column) for r in records})
            part = [r for t in tasks for r in [x for x in records if x.columns.get(subtask_column) == t][:n]]
        save_records(part, folder / f"{name}.jsonl")
        paths[name] = str(folder / f"{name}.jsonl")
    return paths
