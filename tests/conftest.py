"""Shared fixtures: the real tokenizer, tiny models built from a config, small slices of the data."""

from __future__ import annotations

import importlib.util
import json
import shutil
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
    from nice_kit.demo import FAST_OVERRIDES
    from nice_kit.settings import merge_settings

    base = merge_settings(FAST_OVERRIDES, {"data": {**data, "max_length": 64}, "projection": {"dim": 256},
                                          "gradients": {"chunk_size": 8, "batch_size": 4}})
    return RunConfig.from_dict(merge_settings(base, over))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory):
    """The fast-mode demo run (notebook 01's quickstart: the tiny random model on a slice of the
    bundled data), finished, with NICE's per-completion gradients: built once per test session and
    shared by every module that asks for it (tests/test_widgets.py, tests/test_browser.py).

    Shared means read-only: never write into ``fast_run.run_dir`` (no stage, no config). A test that
    changes a run works on its own copy (:func:`copy_run`)."""
    from nice_kit.demo import demo_pipeline
    from nice_kit.explain import completion_vectors

    torch.set_num_threads(1)
    p = demo_pipeline(tmp_path_factory.mktemp("fast_run") / "quickstart-fast", fast=True, verbose=False)
    p.run()
    completion_vectors(p, "nice")
    return p


def copy_run(run, dest: Path, leave_out: tuple[str, ...] = ()):
    """A copy of ``run``'s directory at ``dest`` (without the files or folders named in
    ``leave_out``, glob patterns), opened as a pipeline that shares ``run``'s model."""
    shutil.copytree(run.run_dir, dest, ignore=shutil.ignore_patterns(*leave_out))
    return run.sibling(dest, run.cfg)


if importlib.util.find_spec("xdist"):
    def pytest_xdist_make_scheduler(config, log):
        """``-n 2 --dist loadfile`` (the README's test command): each test file runs on one worker (its
        module fixtures are built once), and the notebooks all on one worker, in order (notebook 05
        opens the run notebook 01 makes)."""
        if config.getvalue("dist") != "loadfile":
            return None
        from xdist.scheduler import LoadScopeScheduling

        class FilesAndNotebooks(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                path = nodeid.split("::", 1)[0]
                return "notebooks" if path.endswith(".ipynb") else path

        return FilesAndNotebooks(config, log)
