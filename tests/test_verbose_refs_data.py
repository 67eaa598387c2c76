"""Checks on the second bundled scenario, data/verbose_refs/ (scripts/make_benchmark.py --scenario
verbose_refs): verbose references that the strict metric scores 0, a pool that mixes concise and
verbose, correct and wrong, on-task and off-task examples, flagged for the diagnostics."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from test_benchmark_data import _load_script  # the one loader of scripts/make_benchmark.py

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "verbose_refs"
CONFIG = ROOT / "configs" / "verbose_refs.toml"
SCRIPT = ROOT / "scripts" / "make_benchmark.py"
FILES = ("pool.jsonl", "target_val.jsonl", "target_test.jsonl", "README.md")
SUBTASKS = ("products", "basic_arithmetic")
POOL_FIELDS = {"id", "messages", "task", "source", "on_task", "harmful", "harm_kind", "style", "correct", "answer",
               "metadata"}
TARGET_FIELDS = {"id", "prompt", "response", "task", "answer", "metadata"}


def _read(name: str) -> list[dict]:
    with (DATA / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def pool() -> list[dict]:
    return _read("pool.jsonl")


@pytest.fixture(scope="module")
def targets() -> list[dict]:
    return _read("target_val.jsonl") + _read("target_test.jsonl")


@pytest.fixture(scope="module")
def strict():
    """The scenario's metric, as the config names it (task_score, strict first-line extraction)."""
    from nice_kit.config import RunConfig
    from nice_kit.metrics import get_metric

    cfg = RunConfig.from_file(CONFIG, check_model=False)
    assert (cfg.metric.name, cfg.metric.params) == ("task_score", {"extract": "strict"})
    metric = get_metric(cfg.metric.name, **cfg.metric.params)

    def score(recs: list[dict], completions: list[str]) -> list[float]:
        return metric([""] * len(recs), completions, task=[r["task"] for r in recs],
                      answer=[r["answer"] for r in recs], metadata=[r["metadata"] for r in recs])
    return score


def _response(rec: dict) -> str:
    return rec["messages"][-1]["content"]


def test_config_points_at_the_scenario():
    from nice_kit.config import RunConfig

    cfg = RunConfig.from_file(CONFIG, check_model=False)
    for name in ("pool", "target_val", "target_test"):
        assert Path(getattr(cfg.data, name)).resolve() == (DATA / f"{name}.jsonl").resolve()


def test_counts_and_fields(pool, targets):
    assert len(pool) == 190
    assert all(set(r) == POOL_FIELDS for r in pool)
    assert all(set(r) == TARGET_FIELDS for r in targets)
    cells = Counter((r["task"], r["style"], r["correct"]) for r in pool if r["on_task"])
    for task in SUBTASKS:
        assert cells[(task, "concise", True)] == 25 and cells[(task, "concise", False)] == 15
        assert cells[(task, "verbose", True)] == 25 and cells[(task, "verbose", False)] == 10
    off = [r for r in pool if not r["on_task"]]
    assert Counter(r["style"] for r in off) == {"concise": 28, "verbose": 12}
    assert all(r["correct"] for r in off) and not set(r["task"] for r in off) & set(SUBTASKS)
    assert Counter(r["id"].split("-")[1] for r in targets) == {"products": 40, "basic_arithmetic": 40}
    ids = [r["id"] for r in pool + targets]
    assert len(ids) == len(set(ids))


def test_flags_follow_style_and_correctness(pool):
    for r in pool:
        want = "verbose" if r["style"] == "verbose" else (None if r["correct"] else "wrong_answer")
        assert r["harm_kind"] == want and r["harmful"] == (want is not None), r["id"]
        assert r["on_task"] == (r["task"] in SUBTASKS)
        resp = _response(r)
        if r["style"] == "verbose":
            assert resp.count("\n") == 2, r["id"]
        else:
            assert "\n" not in resp and (resp == r["answer"]) == r["correct"], r["id"]


def test_references_are_verbose_and_score_zero(targets, strict):
    """The point of the scenario: each reference holds its answer, but not on the first line, so the
    metric gives the reference 0 and the bare answer 1."""
    for r in targets:
        ref = r["response"]
        assert "\n" in ref and ref.strip().splitlines()[0].strip() != r["answer"], r["id"]
        assert re.search(rf"(?<![\d-]){re.escape(r['answer'])}\.?$", ref), r["id"]  # ends on the answer
        assert "only" in r["prompt"].lower()
    assert strict(targets, [r["response"] for r in targets]) == [0.0] * len(targets)
    assert strict(targets, [r["answer"] for r in targets]) == [1.0] * len(targets)


def test_on_task_pool_scores_by_style_and_correctness(pool, strict):
    on = [r for r in pool if r["on_task"]]
    got = strict(on, [_response(r) for r in on])
    want = [float(r["style"] == "concise" and r["correct"]) for r in on]
    assert got == want
    # a wrong verbose example's number is wrong; a correct one's is the answer
    for r in on:
        if r["style"] == "verbose":
            last = re.findall(r"-?\d+", _response(r))[-1]
            assert (last == r["answer"]) == r["correct"], r["id"]


def test_no_question_overlap(pool, targets):
    pool_q = {r["messages"][0]["content"] for r in pool}
    target_q = [r["prompt"] for r in targets]
    assert len(target_q) == len(set(target_q)) and not pool_q & set(target_q)

    def pair(expr: str) -> tuple[str, ...]:
        return tuple(sorted(expr.split(" * ")))

    pool_pairs = {pair(r["metadata"]["expression"]) for r in pool if r["task"] == "products"}
    assert not {pair(r["metadata"]["expression"]) for r in targets if r["task"] == "products"} & pool_pairs


def test_regenerates_byte_identical(tmp_path):
    _load_script().main(["--scenario", "verbose_refs", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_another_seed_gives_other_data(tmp_path):
    """The seed is used (the check above is not passing on a constant)."""
    _load_script().main(["--scenario", "verbose_refs", "--out", str(tmp_path), "--seed", "7"])
    assert (tmp_path / "pool.jsonl").read_bytes() != (DATA / "pool.jsonl").read_bytes()


def test_fast_mode_slices_the_scenario(tmp_path):
    """nice_kit.scenarios' fast mode (notebook 07, the browser test): a slice of this scenario, both styles,
    both subtasks; full mode: the scenario's own files and metric."""
    from nice_kit.data import load_records
    from nice_kit.scenarios import scenario_config

    fast = scenario_config(tmp_path / "run", fast=True)
    pool = load_records(fast.data.pool)
    assert len(pool) == 40 and Path(fast.data.pool).parent == tmp_path / "run" / "data"
    assert {r.columns["style"] for r in pool} == {"concise", "verbose"}
    assert [r.id for r in pool] == [r["id"] for r in _read("pool.jsonl")[:40]]
    val = load_records(fast.data.target_val)
    assert Counter(r.columns["task"] for r in val) == {t: 4 for t in SUBTASKS}
    full = scenario_config(tmp_path / "full", fast=False)
    assert Path(full.data.pool).resolve() == (DATA / "pool.jsonl").resolve()
    assert (full.metric.name, full.metric.params) == ("task_score", {"extract": "strict"})
