"""What-ifs from stored vectors equal fresh runs with the same settings."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_config
from nice_kit.models import tiny_model
from nice_kit.pipeline import Pipeline
from nice_kit.whatif import NeedsRecompute, completion_parts, what_if, what_if_config


@pytest.fixture(scope="module")
def run(tokenizer, small_data, tmp_path_factory):
    torch.set_num_threads(1)
    p = Pipeline(tiny_config(small_data), tmp_path_factory.mktemp("whatif") / "run", model=tiny_model(tokenizer),
                 tokenizer=tokenizer, verbose=False)
    p.run()
    return p


def fresh(run, changes: dict, dest):
    """A fresh run with the what-if's settings: the same warmup, samples and training gradients
    (copied), NICE's validation gradients and scores computed from scratch."""
    cfg = what_if_config(run, changes)
    (dest / "grads").mkdir(parents=True)
    for part in ("warmup", "rollouts", "grads/train"):
        shutil.copytree(run.run_dir / part, dest / part)
    q = run.sibling(dest, cfg)
    q.validation_gradients("nice")
    return q, q.scores(["nice"])


CASES = [
    {"policy.baseline": "none"},
    {"policy.baseline": "loo", "policy.token_normalize": True},
    {"metric.params": {"max_words": 2}},
    {"metric.name": lambda prompts, completions, **cols: [(len(c) % 3) / 2 for c in completions]},  # a user's
    {"policy.variant": "topk", "policy.topk": 2, "policy.include_eos": False},
    {"policy.variant": "rejection", "policy.baseline": "none", "selection.aggregate": "mean"},
    {"policy.estimator": "reference", "policy.variant": "vanilla", "policy.baseline": "none"},
    {"policy.estimator": "reference", "policy.variant": "topk_hard", "policy.baseline": "none",
     "policy.worst_case_protect": True, "policy.do_normalize": True},
]


def _case_id(changes: dict) -> str:
    """The same id in every pytest-xdist worker (a function's repr names its address)."""
    return ",".join(f"{k}={'<user metric>' if callable(v) else v}" for k, v in changes.items())


@pytest.mark.parametrize("changes", CASES, ids=_case_id)
def test_what_if_equals_a_fresh_run(run, changes, tmp_path):
    got = what_if(run, changes)
    q, scores = fresh(run, changes, tmp_path / "fresh")
    expected = scores.set_index("id")["nice"].reindex(got.scores["id"]).to_numpy()
    # float16 storage: the fresh run stores the prompt vector's unit row, the what-if sums stored parts
    assert np.abs(got.scores["what_if"].to_numpy() - expected).max() <= 2e-3
    from nice_kit.influence import top_fraction

    assert got.selected == top_fraction(got.scores["id"].tolist(), expected, q.cfg.selection.fraction)


def test_what_if_reads_without_the_model_and_writes_no_config(run, tmp_path):
    completion_parts(run)  # stored once
    config_before = (run.run_dir / "config.json").read_text()
    diag_before = (run.run_dir / "diagnostics.csv").read_bytes() if (run.run_dir / "diagnostics.csv").exists() else None
    viewer = Pipeline(run.cfg, run.run_dir, tokenizer=run.tokenizer, verbose=False)
    got = viewer.what_if({"policy.baseline": "none"})
    assert not viewer.holds_model  # never loaded
    assert (run.run_dir / "config.json").read_text() == config_before
    now = (run.run_dir / "diagnostics.csv").read_bytes() if (run.run_dir / "diagnostics.csv").exists() else None
    assert now == diag_before
    assert got.overlap <= len(got.selected) and set(got.current) == set(run.select()["nice"])
    assert {"current", "what_if", "rank_move"} <= set(got.scores.columns)
    # the same settings as the run: the run's own scores and selection, within float16 storage
    same = viewer.what_if({})
    assert np.abs(same.scores["what_if"] - same.scores["current"]).max() <= 2e-3
    assert same.selected == same.current


def test_what_if_refuses_what_needs_new_samples_or_gradients(run):
    for key in ("rollouts.k", "rollouts.temperature", "data.max_length", "projection.dim", "warmup.epochs"):
        with pytest.raises(NeedsRecompute, match=key):
            what_if(run, {key: 3})
    with pytest.raises(ValueError, match="no setting 'policy.bseline'"):
        what_if(run, {"policy.bseline": "none"})
    with pytest.raises(ValueError, match="subtracts no baseline"):
        what_if(run, {"policy.estimator": "reference"})


CALLS: list[int] = []


def odd_length(prompts, completions, **columns):
    """A user metric (module level: its cache key is its code, not a closure's changing state)."""
    CALLS.append(len(completions))
    return [float(len(c) % 2) for c in completions]


def test_what_if_with_a_user_metric_caches_its_rewards(run):
    a = what_if(run, {"metric.name": odd_length})
    n = len(CALLS)
    assert n > 0
    b = what_if(run, {"metric.name": odd_length})
    assert len(CALLS) == n and (a.scores["what_if"] == b.scores["what_if"]).all()  # rewards read back


def test_cli_what_if(tmp_path, small_data, tiny_model_dir, capsys):
    from test_cli import _config

    from nice_kit.cli import main

    cfg, run_dir = _config(tmp_path, small_data, tiny_model_dir), tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--run-dir", str(run_dir)]) == 0
    out = tmp_path / "whatif.csv"
    capsys.readouterr()
    assert main(["what-if", "--config", str(cfg), "--run-dir", str(run_dir), "--set", "policy.baseline=none",
                 "--set", "metric.params.max_words=2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "policy.baseline" in text and "shares" in text and "largest rank moves" in text
    assert list(__import__("pandas").read_csv(out).columns)[:3] == ["id", "current", "what_if"]
    assert main(["what-if", "--config", str(cfg), "--run-dir", str(run_dir), "--set", "rollouts.k=4"]) == 2
    assert "rollouts.k" in capsys.readouterr().err
