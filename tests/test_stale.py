"""Never stale: what each stage depends on, and readers that refuse results made from other settings."""

import json
import shutil

import pandas as pd
import pytest

import nice_kit.stages as stages_mod
from conftest import tiny_config
from nice_kit.models import tiny_model
from nice_kit.pipeline import Pipeline
from nice_kit.runs import StaleResultError


def make(tokenizer, data, run_dir, **over):
    return Pipeline(tiny_config(data, **over), run_dir, model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)


def boom(*a, **k):
    raise AssertionError("recomputed a stage whose inputs did not change")


@pytest.fixture(scope="module")
def done(tokenizer, small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stale")
    p = make(tokenizer, small_data, run_dir)
    p.run()
    return p


def copy_run(p, dest):
    shutil.copytree(p.run_dir, dest)
    return dest


@pytest.mark.parametrize("section,change,setting", [
    ("policy", {"baseline": "none"}, "policy.baseline"),
    ("metric", {"name": "length", "params": {"max_words": 1}}, "metric.params.max_words"),
    ("rollouts", {"temperature": 0.7}, "rollouts.temperature"),
    ("warmup", {"lr": 0.02}, "warmup.lr"),
    ("projection", {"seed": 5}, "projection.seed"),
])
def test_readers_refuse_vectors_and_scores_made_from_other_settings(done, tokenizer, tmp_path, section, change,
                                                                     setting):
    run_dir = copy_run(done, tmp_path / "r")
    q = make(tokenizer, {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}, run_dir,
             **{section: change})
    with pytest.raises(StaleResultError, match=setting.replace(".", r"\.")) as err:
        q.scores()
    assert "Recompute:" in str(err.value)
    with pytest.raises(StaleResultError, match=setting.replace(".", r"\.")):
        q.select()  # reads scores.csv: refused, not silently reused
    from nice_kit.evaluation import subset_ids

    with pytest.raises(StaleResultError):
        subset_ids(q, "nice", 0.1, seed=0)
    # the stored results were not touched by the refusal
    assert (run_dir / "scores.csv").read_text() == (done.run_dir / "scores.csv").read_text()


def test_settings_that_do_not_change_results_do_not_invalidate(done, tokenizer, tmp_path):
    run_dir = copy_run(done, tmp_path / "r")
    data = {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}
    # batch sizes, chunk sizes, and policy settings the variant does not use
    q = make(tokenizer, data, run_dir, gradients={"batch_size": 3, "chunk_size": 5}, rollouts={"batch_size": 7},
             policy={"topk": 2, "fallback_to_reference": False})
    pd.testing.assert_frame_equal(q.read_scores(), pd.read_csv(done.run_dir / "scores.csv", dtype={"id": str}))


def test_a_new_target_task_reuses_the_warmup_and_the_pool_gradients(done, tokenizer, tmp_path, monkeypatch):
    from nice_kit.data import load_records, save_records

    run_dir = copy_run(done, tmp_path / "r")
    other = tmp_path / "other_target.jsonl"
    recs = load_records(done.cfg.data.target_val)
    save_records(list(reversed(recs))[:2], other)
    data = {"pool": done.cfg.data.pool, "target_val": str(other), "target_test": done.cfg.data.target_test}
    q = make(tokenizer, data, run_dir)
    monkeypatch.setattr(stages_mod, "train_lora", boom)
    real = stages_mod.projected_gradients
    monkeypatch.setattr(stages_mod, "projected_gradients", boom)
    q.warmup()
    q.train_gradients()  # nothing recomputed
    monkeypatch.setattr(stages_mod, "projected_gradients", real)
    q.validation_gradients("less")
    scores = q.scores(["less"])
    assert len(scores) == len(done.pool) and scores["less"].notna().all()
    # a label-free switch does not touch the pool side either
    monkeypatch.setattr(stages_mod, "projected_gradients", boom)
    lf = make(tokenizer, {**data, "label_free": True}, run_dir)
    lf.warmup()
    lf.train_gradients()


def test_interrupted_rollouts_resume_with_another_chunk_size(tokenizer, small_data, tmp_path, monkeypatch):
    p = make(tokenizer, small_data, tmp_path / "a", gradients={"chunk_size": 2})
    p.warmup()
    calls = {"n": 0}
    real = stages_mod.sample_rollouts

    def crash_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(stages_mod, "sample_rollouts", crash_second)
    with pytest.raises(KeyboardInterrupt):
        p.rollouts(p.checkpoints[0])
    monkeypatch.setattr(stages_mod, "sample_rollouts", real)
    resumed = make(tokenizer, small_data, tmp_path / "a", gradients={"chunk_size": 4}).rollouts(p.checkpoints[0])
    assert sorted(set(resumed["prompt_id"])) == sorted(r.id for r in p.target_val)
    assert len(resumed) == len(p.target_val) * p.cfg.rollouts.k  # nothing duplicated or dropped
    layout = json.loads((tmp_path / "a" / "rollouts" / "epoch_1" / "layout.json").read_text())
    assert layout["chunk_size"] == 2  # the stage kept the layout it started with


def _factory(threshold):
    def metric(prompts, completions, **columns):
        return [float(len(c) > threshold) for c in completions]

    return metric


def test_two_closures_of_one_factory_do_not_share_rewards(done, tokenizer, tmp_path):
    run_dir = copy_run(done, tmp_path / "r")
    data = {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}
    rewards = []
    for threshold in (0, 10_000):
        cfg = tiny_config(data)
        cfg.metric.name, cfg.metric.params = _factory(threshold), {}
        q = Pipeline(cfg, run_dir, model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)
        rewards.append(q.rollouts(q.checkpoints[0])["reward"].tolist())
    assert rewards[1] == [0.0] * len(rewards[1]) and rewards[0] != rewards[1]


def test_label_free_runs_pass_no_reference_column_to_any_metric(tokenizer, small_data, tmp_path):
    seen = []

    def spy(prompts, completions, **columns):
        seen.append(sorted(columns))
        return [float(len(c) % 2) for c in completions]

    cfg = tiny_config({**small_data, "label_free": True})  # the target files do have an `answer` column
    cfg.metric.name, cfg.metric.params = spy, {}
    p = Pipeline(cfg, tmp_path / "lf", model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)
    p.warmup()
    p.rollouts(p.checkpoints[0])
    assert seen and all("answer" not in s and "response" not in s for s in seen)
    assert "task" in seen[0]  # non-reference columns still reach the metric
    _, passed, withheld = p.metric_columns(p.target_val)
    assert "answer" in withheld and "answer" not in passed


def test_evaluation_key_holds_what_the_finetuning_depends_on(done, tokenizer):
    from nice_kit.evaluation import evaluation_inputs

    data = {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}
    base = evaluation_inputs(done, done.target_test)
    for over, name in (({"lora": {"r": 4}}, "lora"), ({}, "max_length"), ({"rollouts": {"stop": ["\n"]}}, "stop")):
        cfg = tiny_config(data, **over)
        if name == "max_length":
            cfg.data.max_length = 48
        q = Pipeline(cfg, done.run_dir.parent / f"unused_{name}", tokenizer=tokenizer)
        assert evaluation_inputs(q, q.target_test) != base, name


def test_evaluation_varies_selection_and_finetuning_seeds(tokenizer, small_data, tmp_path, monkeypatch):
    from nice_kit import evaluation

    p = make(tokenizer, small_data, tmp_path / "ev", evaluation={"epochs": 1, "max_new_tokens": 4})
    p.run()
    trained = []
    monkeypatch.setattr(evaluation, "finetune_and_evaluate",
                        lambda run, ids, seed, test: trained.append((tuple(ids), seed)) or
                        {"metric": float(len(trained)), "n_test": len(test)})
    df = evaluation.compare(p, methods=["random", "nice", "full"], seeds=[0, 1], selection_seeds=[0, 1])
    assert set(zip(df["method"], df["selection_seed"])) == {("random", 0), ("random", 1), ("nice", 0), ("nice", 1),
                                                            ("full", 0)}
    sibling = tmp_path / "ev" / "selection_seeds" / "s1"
    cfg = json.loads((sibling / "config.json").read_text())
    assert cfg["seed"] == p.cfg.seed + 1 and cfg["projection"]["seed"] == p.cfg.projection.seed + 1
    assert (sibling / "scores.csv").exists()
    summary = evaluation.summarize(df).set_index("method")
    assert summary.loc["nice", "n_selections"] == 2 and summary.loc["nice", "n_finetune_seeds"] == 2
    assert summary.loc["full", "n_selections"] == 1
    assert summary["sd_selection"].notna()["nice"] and summary["sd_finetune"].notna()["nice"]
    n = len(trained)
    evaluation.compare(p, methods=["random", "nice", "full"], seeds=[0, 1], selection_seeds=[0, 1])
    assert len(trained) == n  # every row was kept: nothing retrained


def test_summarize_counts_both_sources_of_variance():
    """Runs of one selection share its subset: with several selections the standard error is that of
    the per-selection means; with one, that of the runs. Values computed by hand."""
    from nice_kit.evaluation import summarize

    rows = [{"method": "nice", "fraction": 0.1, "selection_seed": s, "seed": t, "metric": m, "loss": 1.0 + m}
            for s, ms in enumerate(([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])) for t, m in enumerate(ms)]
    rows += [{"method": "full", "fraction": 1.0, "selection_seed": 0, "seed": t, "metric": m, "loss": 1.0}
             for t, m in enumerate((0.2, 0.4))]
    out = summarize(pd.DataFrame(rows)).set_index("method")
    nice, full = out.loc["nice"], out.loc["full"]
    assert nice["metric_mean"] == pytest.approx(0.35)
    assert nice["sd_selection"] == pytest.approx(0.3 / 2 ** 0.5)  # selection means 0.2 and 0.5
    assert nice["sd_finetune"] == pytest.approx(0.1)  # each selection's runs: sd 0.1
    assert nice["metric_se"] == pytest.approx(0.15)  # sd of the 2 means / sqrt(2), not the 6 runs' 0.076
    assert nice["loss_se"] == pytest.approx(0.15)
    assert full["metric_se"] == pytest.approx(0.1) and pd.isna(full["sd_selection"])  # sd 0.141 / sqrt(2)


def test_rollouts_do_not_depend_on_chunk_or_batch_sizes(done, tokenizer, tmp_path):
    data = {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}
    frames = []
    for i, (chunk, batch) in enumerate(((1, 1), (2, 3), (64, 256))):
        shutil.copytree(done.run_dir / "warmup", tmp_path / f"r{i}" / "warmup")
        q = make(tokenizer, data, tmp_path / f"r{i}", gradients={"chunk_size": chunk}, rollouts={"batch_size": batch})
        frames.append(q.rollouts(q.checkpoints[-1])[["prompt_id", "sample", "token_ids", "completion"]])
    for f in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], f)
    assert frames[0].equals(done.rollouts(done.checkpoints[-1])[["prompt_id", "sample", "token_ids", "completion"]])


def test_scores_csv_is_replaced_atomically(done, tokenizer, tmp_path, monkeypatch):
    run_dir = copy_run(done, tmp_path / "r")
    before = (run_dir / "scores.csv").read_text()
    data = {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}
    q = make(tokenizer, data, run_dir)
    real = pd.DataFrame.to_csv

    def crash_half_way(self, path, *a, **k):
        real(self.iloc[: len(self) // 2], path, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        q.scores()
    assert (run_dir / "scores.csv").read_text() == before  # the old file, whole


def test_evaluate_says_which_method_and_seeds_it_is_on(done, tokenizer, tmp_path, monkeypatch, capsys):
    from nice_kit import evaluation

    run_dir = copy_run(done, tmp_path / "r")
    data = {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}
    q = Pipeline(tiny_config(data), run_dir, model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=True)
    monkeypatch.setattr(evaluation, "finetune_and_evaluate", lambda run, ids, seed, test: {"metric": 0.0, "n_test": 1})
    evaluation.compare(q, methods=["random", "nice"], seeds=[3])
    out = capsys.readouterr()
    text = out.out + out.err
    assert "evaluate random (selection seed 0, fine-tuning seed 3" in text
    assert "evaluate nice (selection seed 0, fine-tuning seed 3" in text


def test_speed_only_settings_change_results_only_within_the_stated_tolerance(done, tokenizer, tmp_path):
    """Issue #20 failure 7: gradients.chunk_size and gradients.batch_size change results in the last
    bits while config.py said results do not depend on them. They still do (float summation order);
    config.py now states the tolerance, and this test holds the code to it."""
    import numpy as np

    data = {k: getattr(done.cfg.data, k) for k in ("pool", "target_val", "target_test")}
    base = done.read_scores()
    for sizes in ({"chunk_size": 3, "batch_size": 2}, {"chunk_size": 24, "batch_size": 8}):
        run_dir = tmp_path / f"c{sizes['chunk_size']}"
        shutil.copytree(done.run_dir, run_dir, ignore=shutil.ignore_patterns("grads", "scores.*", "selected*"))
        q = make(tokenizer, data, run_dir, gradients=sizes)
        q.run()
        got = q.read_scores()
        for m in ("less", "nice"):
            np.testing.assert_allclose(got[m], base[m], rtol=0, atol=1e-5)  # config.py: scores within 1e-5
        for which in ("train", "less", "nice"):
            for a, b in zip(done.stored_vectors(which), q.stored_vectors(which)):
                np.testing.assert_allclose(a.all().numpy(), b.all().numpy(), rtol=0, atol=1e-3)  # entries within 1e-3
