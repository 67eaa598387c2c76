"""The linear datamodeling score: Spearman on hand-made cases, resuming after a kill, a user's column."""

import math

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config
from nice_kit import evaluation
from nice_kit.evaluation import LDSResult, lds, lds_from_trainings, lds_subset, rank_correlation, read_rows
from nice_kit.models import tiny_model
from nice_kit.pipeline import Pipeline
from test_measurements import BareAnswerLoss


def make(tokenizer, data, run_dir, **over):
    return Pipeline(tiny_config(data, **over), run_dir, model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)


@pytest.fixture(scope="module")
def done(tokenizer, small_data, tmp_path_factory):
    """A finished tiny run with LESS, NICE and a user's own measurement (bare_answer) in scores.csv."""
    p = make(tokenizer, small_data, tmp_path_factory.mktemp("lds") / "run",
             evaluation={"epochs": 1, "max_new_tokens": 4})
    p.run(["less", "nice", BareAnswerLoss()])
    return p


# ---- Spearman, by hand

def test_rank_correlation_on_hand_made_cases():
    # no ties: ranks (1,4,2,3) against (1,4,3,2); d = (0,0,-1,1); 1 - 6*2/(4*(16-1)) = 0.8
    assert rank_correlation([0.1, 0.4, 0.2, 0.3], [1, 4, 3, 2]) == pytest.approx(0.8, abs=1e-12)
    # ties get average ranks: (1.5,1.5,3,4) against (1,2,3,4): cov 4.5 / sqrt(4.5 * 5)
    assert rank_correlation([1, 1, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-12)
    assert rank_correlation([1, 2, 3], [np.exp(1), np.exp(5), np.exp(9)]) == pytest.approx(1.0, abs=1e-12)  # monotone
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))  # a constant side has no ranking
    with pytest.raises(ValueError, match="3 values against 2"):
        rank_correlation([1, 2, 3], [1, 2])


def test_lds_tables_on_a_hand_made_case():
    """Five subsets of a six-example pool; the outcome is made from column ``good``'s sums, so its LDS is
    1 on the metric; ``bad`` is minus ``good`` (LDS -1); the loss is made to fall as ``good``'s sum rises,
    so predicting the loss (correlated against minus the loss) is 1 too; ``half`` is computed by hand."""
    ids = [f"e{i}" for i in range(6)]
    scores = pd.DataFrame({"good": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "half": [0.0, 1.0, 0.0, 0.0, 1.0, 1.0]},
                          index=ids)
    scores["bad"] = -scores["good"]
    subsets = [["e0", "e1"], ["e0", "e2"], ["e1", "e3"], ["e3", "e4"], ["e4", "e5"]]
    good = [scores.loc[s, "good"].sum() for s in subsets]  # 0.3, 0.4, 0.6, 0.9, 1.1
    rows = [{"subset": i, "seed": seed, "metric": g + 0.01 * seed, "loss": 3.0 - g} for i, g in enumerate(good)
            for seed in (0, 1)]
    res = lds_from_trainings(pd.DataFrame(rows), subsets, scores, n_bootstrap=200)
    assert isinstance(res, LDSResult)
    t = res.table.set_index(["method", "target"])["lds"]
    assert t[("good", "metric")] == pytest.approx(1.0) and t[("good", "loss")] == pytest.approx(1.0)
    assert t[("bad", "metric")] == pytest.approx(-1.0) and t[("bad", "loss")] == pytest.approx(-1.0)
    # half's sums: 1, 0, 1, 1, 2 -> ranks (3, 1, 3, 3, 5) against (1, 2, 3, 4, 5); deviations (0, -2, 0, 0, 2)
    # and (-2, -1, 0, 1, 2): 6 / sqrt(8 * 10)
    assert t[("half", "metric")] == pytest.approx(6 / math.sqrt(80))
    sub = res.subsets.set_index("subset")
    assert sub["pred_good"].tolist() == pytest.approx(good)
    assert sub["metric"].tolist() == pytest.approx([g + 0.005 for g in good])  # mean over the two seeds
    assert (sub["n_seeds"] == 2).all() and (sub["n_train"] == 2).all()
    ci = res.table.set_index(["method", "target"])
    assert ci.loc[("good", "metric"), "ci_low"] == pytest.approx(1.0)  # every resample ranks perfectly
    lo, hi = ci.loc[("half", "metric"), ["ci_low", "ci_high"]]
    assert lo <= t[("half", "metric")] <= hi
    d = res.differences.set_index(["target", "a", "b"])
    assert d.loc[("metric", "good", "bad"), "difference"] == pytest.approx(2.0)
    assert "good +1.00" in evaluation.describe_lds(res)


def test_subsets_are_stable_and_sized():
    ids = [f"p{i}" for i in range(40)]
    a = [lds_subset(ids, 0.5, 0, i) for i in range(4)]
    assert all(len(s) == 20 and s == sorted(s) for s in a)
    assert a == [lds_subset(ids, 0.5, 0, i) for i in range(4)]  # asking again (or for more) keeps them
    assert len({tuple(s) for s in a}) == 4 and lds_subset(ids, 0.5, 1, 0) != a[0]
    with pytest.raises(ValueError, match="fraction"):
        lds_subset(ids, 1.5, 0, 0)


# ---- on a tiny model

def test_lds_resumes_after_a_kill_and_includes_a_users_measurement(done, monkeypatch):
    real = evaluation.finetune_and_evaluate
    calls = []

    def killed_on_third(run, ids, seed, test):
        calls.append((tuple(ids), seed))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies in the middle of its third training
        return real(run, ids, seed, test)

    monkeypatch.setattr(evaluation, "finetune_and_evaluate", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        lds(done, n_subsets=4, fraction=0.5, seeds=[0], measurements=[BareAnswerLoss()], n_bootstrap=50)
    stored = read_rows(done.run_dir / "evaluation" / "lds.csv")
    assert len(stored) == 2 and stored["subset"].tolist() == [0, 1]  # the two finished trainings were kept

    calls.clear()
    monkeypatch.setattr(evaluation, "finetune_and_evaluate", lambda run, ids, seed, test:
                        calls.append((tuple(ids), seed)) or real(run, ids, seed, test))
    res = lds(done, n_subsets=4, fraction=0.5, seeds=[0], measurements=[BareAnswerLoss()], n_bootstrap=50)
    pool = [r.id for r in done.pool]
    assert calls == [(tuple(lds_subset(pool, 0.5, 0, i)), 0) for i in (2, 3)]  # only the missing ones
    after = read_rows(done.run_dir / "evaluation" / "lds.csv")
    assert len(after) == 4
    pd.testing.assert_frame_equal(after.iloc[:2], stored)  # rows from before the kill unchanged
    assert set(res.table["method"]) == {"less", "nice", "bare_answer"}
    assert set(res.table["target"]) == {"metric", "loss"}
    loss_rows = res.table[res.table["target"] == "loss"]
    assert loss_rows["lds"].between(-1, 1).all() and len(res.trainings) == 4
    if res.subsets["metric"].nunique() == 1:  # the tiny model's metric can be constant: no ranking, NaN
        assert res.table.loc[res.table["target"] == "metric", "lds"].isna().all()
    for col in ("answer_top_share", "answer_distinct", "train_top_share", "train_distinct", "cpu_s"):
        assert res.trainings[col].notna().all(), col
    # the predicted effect is the sum of the stored scores over each subset
    scores = done.read_scores([BareAnswerLoss()]).set_index("id")
    for _, row in res.subsets.iterrows():
        ids = lds_subset(pool, 0.5, 0, int(row["subset"]))
        assert row["pred_bare_answer"] == pytest.approx(scores.loc[ids, "bare_answer"].sum(), rel=1e-9)

    calls.clear()
    again = lds(done, n_subsets=5, fraction=0.5, seeds=[0], measurements=[BareAnswerLoss()], n_bootstrap=50)
    assert len(calls) == 1 and len(again.subsets) == 5  # one more subset: the first four reused


def test_lds_retrains_when_the_evaluation_settings_change(done, tokenizer, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(done.run_dir, tmp_path / "r", ignore=shutil.ignore_patterns("evaluation"))
    data = {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}
    trained = []
    monkeypatch.setattr(evaluation, "finetune_and_evaluate", lambda run, ids, seed, test:
                        trained.append(seed) or {"metric": float(len(trained) % 3), "loss": 1.0, "n_test": len(test)})
    q = make(tokenizer, data, tmp_path / "r", evaluation={"epochs": 1, "max_new_tokens": 4})
    lds(q, n_subsets=3, methods=["less", "nice"], measurements=[BareAnswerLoss()], n_bootstrap=20)
    assert trained == [0, 0, 0]
    lds(q, n_subsets=3, methods=["less", "nice"], measurements=[BareAnswerLoss()], n_bootstrap=20)
    assert trained == [0, 0, 0]  # the same settings: every row reused
    q2 = make(tokenizer, data, tmp_path / "r", evaluation={"epochs": 1, "max_new_tokens": 4, "lr": 1e-3})
    lds(q2, n_subsets=3, seeds=[0, 1], methods=["less", "nice"], measurements=[BareAnswerLoss()], n_bootstrap=20)
    assert len(trained) == 3 + 6  # another lr: nothing reused; two seeds per subset


def test_lds_says_what_is_wrong(done, tokenizer):
    data = {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}
    fresh = make(tokenizer, data, done.run_dir, evaluation={"epochs": 1, "max_new_tokens": 4})
    with pytest.raises(ValueError, match="bare_answer"):
        lds(fresh, n_subsets=3)  # the user's column is in scores.csv but its measurement was not passed
    with pytest.raises(ValueError, match="no score column"):
        lds(done, n_subsets=3, methods=["what_if"], measurements=[BareAnswerLoss()])
    with pytest.raises(ValueError, match="at least 3"):
        lds(done, n_subsets=2, measurements=[BareAnswerLoss()])
    with pytest.raises(ValueError, match="no score for"):
        lds(done, n_subsets=3, measurements=[BareAnswerLoss()], extra_scores=pd.DataFrame({"id": ["x"], "w": [1.0]}))


def test_lds_takes_a_what_if_column(done, monkeypatch):
    """extra_scores adds a column; an outcome built from it gives it an LDS of 1."""
    what_if = pd.DataFrame({"id": [r.id for r in done.pool], "what_if": np.arange(len(done.pool), dtype=float)})
    weights = dict(zip(what_if["id"], what_if["what_if"]))
    monkeypatch.setattr(evaluation, "finetune_and_evaluate", lambda run, ids, seed, test:
                        {"metric": sum(weights[i] for i in ids), "loss": -sum(weights[i] for i in ids), "n_test": 1})
    import shutil

    shutil.rmtree(done.run_dir / "evaluation", ignore_errors=True)
    res = lds(done, n_subsets=6, measurements=[BareAnswerLoss()], extra_scores=what_if, n_bootstrap=50)
    t = res.table.set_index(["method", "target"])["lds"]
    assert t[("what_if", "metric")] == pytest.approx(1.0) and t[("what_if", "loss")] == pytest.approx(1.0)
    shutil.rmtree(done.run_dir / "evaluation")  # these rows were made by the fake training


def test_lds_from_the_command_line(tmp_path, small_data, tiny_model_dir):
    from test_cli import _config, nice_kit

    cfg = _config(tmp_path, small_data, tiny_model_dir)
    with open(cfg, "a") as f:
        f.write("[evaluation]\nepochs = 1\nmax_new_tokens = 4\n")
    run_dir = tmp_path / "run"
    out = nice_kit("lds", "--config", str(cfg), "--run-dir", str(run_dir))
    assert out.returncode == 2 and "does not exist" in out.stderr  # a reader: no run, no new directory
    assert nice_kit("run", "--config", str(cfg), "--run-dir", str(run_dir)).returncode == 0
    out = nice_kit("lds", "--config", str(cfg), "--run-dir", str(run_dir), "--subsets", "3", "--fraction", "0.25",
                   "--bootstrap", "20")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Linear datamodeling score (3 random subsets of 25% of the pool" in out.stdout
    assert "less" in out.stdout and "nice" in out.stdout and "CPU minutes" in out.stdout
    assert "3 of 3 trainings left" in out.stderr
    stored = read_rows(run_dir / "evaluation" / "lds.csv")
    assert len(stored) == 3 and (stored["n_train"] == 6).all()
    out = nice_kit("lds", "--config", str(cfg), "--run-dir", str(run_dir), "--subsets", "3", "--fraction", "0.25",
                   "--bootstrap", "20")
    assert out.returncode == 0 and "trainings left" not in out.stderr  # every training reused
