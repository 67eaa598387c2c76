"""Shared fixtures: the real tokenizer, tiny models built from a config, small slices of the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models run several times faster on one thread (docs/method.md, "Measured")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer():
    from nice_kit.models import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A tiny Llama saved like any Hugging Face model directory (config + weights + tokenizer)."""
    from nice_kit.models import tiny_model

    path = tmp_path_factory.mktemp("tiny_model")
    tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, str]:
    from nice_kit.demo import fast_data

    return fast_data(tmp_path_factory.mktemp("data"), n_pool=24, n_val=3, n_test=3)


def tiny_config(data: dict[str, str], **over):
    from nice_kit.config import RunConfig
    from nice_kit.demo import FAST_OVERRIDES, _merge

    base = _merge(FAST_OVERRIDES, {"data": {**data, "max_length": 64}, "projection": {"dim": 256},
                                   "gradients": {"chunk_size": 8, "batch_size": 4}})
    return RunConfig.from_dict(_merge(base, over))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
