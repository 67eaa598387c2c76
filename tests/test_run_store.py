"""Opening a run for viewing writes nothing, and a run made before the settings redesign (commit
d1de1dc) is reused after it: every stage's key is what that commit stored."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from nice_kit.pipeline import Pipeline

KEYS_BEFORE = Path(__file__).parent / "data" / "fast_run_keys_d1de1dc.json"


def run_keys(run_dir: Path) -> dict:
    """Every stage's key, the scores' inputs and the reward caches' names: what decides reuse."""
    out = {str(p.parent.relative_to(run_dir)): json.loads(p.read_text())["key"] for p in sorted(run_dir.rglob("stage.json"))}
    out["scores.json inputs"] = json.loads((run_dir / "scores.json").read_text())["inputs"]
    out["reward caches"] = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("rewards_*.json"))
    return out


def snapshot(run_dir: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_run_made_before_the_redesign_has_the_keys_it_has_now(fast_run):
    """The fast demo run, made at commit d1de1dc, stored these keys (tests/data): the same run made
    now must compute the same ones, or a run directory made then would be recomputed (or refused)."""
    before, now = json.loads(KEYS_BEFORE.read_text()), run_keys(fast_run.run_dir)
    stages = {k: v for k, v in before.items() if k not in ("scores.json inputs", "reward caches")}
    assert {k: now.get(k) for k in stages} == stages
    assert now["scores.json inputs"] == before["scores.json inputs"]
    assert set(before["reward caches"]) <= set(now["reward caches"])


def test_opening_a_run_for_viewing_writes_nothing(fast_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(fast_run.run_dir, run_dir)
    before = snapshot(run_dir)
    p = Pipeline.open(run_dir)
    scores = p.read_scores()
    assert list(scores.columns) == ["id", "less", "nice"] and len(scores) == len(p.pool)
    assert len(p.stored_vectors("train")) == len(p.checkpoints) == len(p.stored_vectors("nice"))
    assert len(p.rollouts()) > 0 and not p.holds_model
    p.explain(scores["id"].iloc[0], "nice", compute=False)
    assert snapshot(run_dir) == before  # not one byte, not one mtime
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        Pipeline.open(missing)
    assert not missing.exists()
