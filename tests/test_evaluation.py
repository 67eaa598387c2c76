"""compare's quick setting, its size-weighted progress and results as they finish; answer diversity
and collapse on every evaluation row; the diagnostics' random row uses the run's seed."""

import pandas as pd
import pytest

from conftest import tiny_config
from nice_kit import evaluation
from nice_kit.evaluation import answer_diversity, is_collapse, training_cost
from nice_kit.models import tiny_model
from nice_kit.pipeline import Pipeline


def make(tokenizer, data, run_dir, **over):
    return Pipeline(tiny_config(data, **over), run_dir, model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)


@pytest.fixture(scope="module")
def done(tokenizer, small_data, tmp_path_factory):
    p = make(tokenizer, small_data, tmp_path_factory.mktemp("ev") / "run",
             evaluation={"epochs": 1, "max_new_tokens": 4, "seeds": [0, 1]})
    p.run()
    return p


def test_answer_diversity_and_collapse():
    d = answer_diversity(["12", " 12\n", "7", "12", "3"], "answer")
    assert d == {"answer_top_share": pytest.approx(0.6), "answer_distinct": 3, "answer_top": "12"}
    assert answer_diversity([], "train")["train_distinct"] == 0
    assert is_collapse(0.5) and is_collapse(0.95) and not is_collapse(0.49) and not is_collapse(float("nan"))


def test_every_evaluation_row_records_answer_diversity(done):
    test = done.target_test
    by_id = {r.id: r for r in done.pool}
    ids = [r.id for r in done.pool[:6]]
    row = evaluation.finetune_and_evaluate(done, ids, 0, test)
    assert 0 < row["answer_top_share"] <= 1 and 1 <= row["answer_distinct"] <= len(test)
    expected = answer_diversity([by_id[i].response for i in ids], "train")
    assert {k: row[k] for k in expected} == expected


def test_quick_compare_is_one_seed_without_the_full_pool_and_shows_results_as_they_finish(done, tmp_path, tokenizer,
                                                                                          monkeypatch, capsys):
    import shutil

    shutil.copytree(done.run_dir, tmp_path / "r", ignore=shutil.ignore_patterns("evaluation"))
    data = {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}
    q = Pipeline(tiny_config(data, evaluation={"epochs": 1, "max_new_tokens": 4, "seeds": [0, 1]}), tmp_path / "r",
                 model=done.model, tokenizer=tokenizer, verbose=False)
    trained, shown = [], []
    monkeypatch.setattr(evaluation, "finetune_and_evaluate", lambda run, ids, seed, test: trained.append(
        (len(ids), seed)) or {"metric": 0.5, "loss": 1.0, "n_test": len(test), "answer_top_share": 0.9,
                              "answer_distinct": 1, "answer_top": "0"})
    df = evaluation.compare(q, quick=True, on_result=shown.append)
    assert sorted(df["method"]) == ["less", "nice", "random"] and set(df["seed"]) == {0}
    assert len(shown) == 3 and shown[0]["method"] == "random" and "key" not in shown[0]
    out = capsys.readouterr()
    assert "COLLAPSE" in out.out + out.err and "of 3 trainings left" in out.err
    df = evaluation.compare(q, quick=True, full=True)  # asked for: the full pool too, the rest reused
    assert sorted(df["method"]) == ["full", "less", "nice", "random"] and trained[-1] == (len(q.pool), 0)
    assert len(trained) == 4
    df = evaluation.compare(q, methods=["random", "full"], quick=True)  # named: kept
    assert sorted(df["method"]) == ["full", "random"] and len(trained) == 4
    df = evaluation.compare(q, methods=["random", "nice"])  # not quick: every seed, no full unless named
    assert sorted(df["method"]) == ["nice", "nice", "random", "random"] and len(trained) == 6


def test_progress_weights_trainings_by_size():
    assert training_cost(310, 3, 64) / training_cost(31, 3, 64) > 7  # a full-pool training is much larger
    p = evaluation.TrainingProgress([training_cost(31, 3, 64)] * 2 + [training_cost(310, 3, 64)], "evaluate")
    p.done(p.costs[0])
    p.done(p.costs[1])
    assert p.bar.n == pytest.approx(sum(p.costs[:2]), abs=0.2) and p.bar.total == pytest.approx(sum(p.costs), abs=0.2)
    assert p.bar.n / p.bar.total < 0.25  # 2 of 3 trainings done is under a quarter of the work
    assert "1 of 3 trainings left" in p.bar.desc
    p.close()


def test_diagnostics_random_row_uses_the_run_seed(done, tmp_path, tokenizer):
    from nice_kit.diagnostics import selection_diagnostics
    from nice_kit.influence import random_subset

    data = {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}
    chosen = done.select()
    rows = {}
    for seed in (0, 3):
        q = Pipeline(tiny_config(data, seed=seed), tmp_path / f"s{seed}", tokenizer=tokenizer)
        diag = selection_diagnostics(q, chosen).set_index("method")
        assert diag.loc["random", "seed"] == seed
        rows[seed] = diag.loc["random"]
        ids = random_subset([r.id for r in q.pool], len(chosen["nice"]) / len(q.pool), seed)
        flagged = {r.id for r in q.pool if r.columns.get("harmful")}
        assert diag.loc["random", "harmful_share"] == pytest.approx(len(flagged & set(ids)) / len(ids))
        assert 0 < diag.loc["nice", "top_response_share"] <= 1 and diag.loc["pool", "distinct_responses"] > 1
    pool = [r.id for r in done.pool]
    assert random_subset(pool, 0.25, 0) != random_subset(pool, 0.25, 3)  # so the two rows are two different draws


def test_reward_signal_counts_prompts_with_mixed_rewards(done):
    from nice_kit.diagnostics import reward_signal

    sig = reward_signal(done)
    roll = done.rollouts()
    for epoch, g in roll.groupby("epoch"):
        per = g.groupby("prompt_id")["reward"].agg(["min", "max"])
        row = sig[(sig["epoch"] == epoch) & (sig["subtask"] == "all")].iloc[0]
        assert row["prompts"] == len(per) and row["mixed"] == int((per["max"] > per["min"]).sum())
        parts = sig[(sig["epoch"] == epoch) & (sig["subtask"] != "all")]
        assert parts["prompts"].sum() == len(per) and parts["mixed"].sum() == row["mixed"]  # two subtasks


def test_response_values_say_what_a_selection_shares(done):
    from nice_kit.diagnostics import response_values

    ids = [r.id for r in done.pool[:8]]
    top = response_values(done, ids, top=3)
    responses = pd.Series([r.response.strip() for r in done.pool[:8]]).value_counts()
    assert top["count"].iloc[0] == responses.iloc[0] and top["share"].iloc[0] == pytest.approx(responses.iloc[0] / 8)
    assert len(top) == min(3, len(responses)) and (top["harmful"] <= top["count"]).all()


def test_rows_stored_before_diversity_was_recorded_are_still_reused(done, tmp_path, tokenizer, monkeypatch):
    import shutil

    from nice_kit.evaluation import diversity_summary

    shutil.copytree(done.run_dir, tmp_path / "r", ignore=shutil.ignore_patterns("evaluation"))
    data = {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}
    q = Pipeline(tiny_config(data, evaluation={"epochs": 1, "max_new_tokens": 4, "seeds": [0, 1]}), tmp_path / "r",
                 model=done.model, tokenizer=tokenizer, verbose=False)
    trained = []
    monkeypatch.setattr(evaluation, "finetune_and_evaluate", lambda run, ids, seed, test: trained.append(seed) or
                        {"metric": 0.25, "loss": 1.5, "n_test": len(test)})
    evaluation.compare(q, methods=["random", "nice"], seeds=[0])
    old = pd.read_csv(tmp_path / "r" / "evaluation" / "results.csv")
    old.drop(columns=["cpu_s", "wall_s", "check"]).to_csv(tmp_path / "r" / "evaluation" / "results.csv", index=False)  # as before
    df = evaluation.compare(q, methods=["random", "nice"], seeds=[0])
    assert len(trained) == 2 and df["metric"].tolist() == [0.25, 0.25]  # reused, not retrained
    summary = diversity_summary(df)
    assert "collapse" not in summary.columns and summary["metric"].tolist() == [0.25, 0.25]


def test_an_empty_most_common_completion_reads_back_as_text(tmp_path):
    from nice_kit.evaluation import diversity_summary, read_rows

    path = tmp_path / "results.csv"
    pd.DataFrame([{"method": "nice", "fraction": 0.1, "metric": 0.0, "answer_top_share": 1.0, "answer_distinct": 1,
                   "answer_top": "", "train_top_share": 0.5, "train_top": "12"}]).to_csv(path, index=False)
    rows = read_rows(path)
    assert rows["answer_top"].tolist() == [""] and rows["train_top"].tolist() == ["12"]  # text, not NaN or 12
    assert diversity_summary(rows)["collapse"].tolist() == ["COLLAPSE in 1 of 1"]
