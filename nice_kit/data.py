"""Records (one JSONL format for pools and target tasks) and their tokenisation.

A record is a JSON object on one line with a stable ``id`` and either

* ``messages``: a chat, ``[{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]``;
  the last assistant message is the response, everything before it the prompt; or
* ``prompt`` (and, except for label-free target tasks, ``response``).

Any other column (``task``, ``answer``, ``tests``, diagnostic flags ...) is kept untouched in
``Record.columns``: metrics read them, selectors never do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


@dataclass
class Record:
    id: str
    messages: list[dict[str, str]]  # the prompt as a chat (ends with a user turn)
    response: str | None  # reference response (None for label-free target prompts)
    columns: dict[str, Any] = field(default_factory=dict)

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


def _parse_record(obj: Any, where: str, require_response: bool) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise DataError(f"{where}: missing field 'id'")
    rid = obj["id"]
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid).strip() == "":
        raise DataError(f"{where}: 'id' must be a non-empty string or integer, got {rid!r}")
    rid = str(rid)
    columns = {k: v for k, v in obj.items() if k not in ("id", "messages", "prompt", "response")}
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where} (id {rid}): 'messages' must be a non-empty list of {{role, content}} objects")
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
        raise DataError(f"{where} (id {rid}): needs either 'messages' or 'prompt' (and 'response')")
    if response is not None and not response.strip():
        raise DataError(f"{where} (id {rid}): the response is empty")
    if require_response and response is None:
        raise DataError(f"{where} (id {rid}): missing the response ('response' field or a final assistant message)")
    return Record(rid, prompt_msgs, response, columns)


def load_records(path: str | Path, require_response: bool = True) -> list[Record]:
    """Read a JSONL file of records, checking every line; errors name file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    records: list[Record] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            rec = _parse_record(obj, where, require_response)
            if rec.id in seen:
                raise DataError(f"{where}: duplicate id {rec.id!r} (first seen on line {seen[rec.id]})")
            seen[rec.id] = lineno
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def save_records(records: Iterable[Record], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    tmp.replace(path)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
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
            raise DataError(f"record {rec.id!r} has no response to tokenise")
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
