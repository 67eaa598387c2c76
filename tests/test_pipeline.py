"""The pipeline end to end on a tiny model: outputs, caching, resuming, sharding, determinism."""

import json

import pandas as pd
import pytest
import torch

import nice_kit.models as models_mod
import nice_kit.pipeline as pipeline_mod
import nice_kit.stages as stages_mod
from conftest import tiny_config
from nice_kit.models import tiny_model
from nice_kit.pipeline import Pipeline
from nice_kit.runs import load_tensors


def make(tokenizer, data, run_dir, **over):
    return Pipeline(tiny_config(data, **over), run_dir, model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)


@pytest.fixture(scope="module")
def finished(tokenizer, small_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    p = make(tokenizer, small_data, run_dir)
    diag = p.run()
    return p, diag


def test_a_finished_run_holds_scores_selection_and_diagnostics(finished):
    p, diag = finished
    scores = pd.read_csv(p.run_dir / "scores.csv", dtype={"id": str})
    assert list(scores.columns) == ["id", "less", "nice"] and len(scores) == len(p.pool)
    assert scores[["less", "nice"]].notna().all().all()
    selected = [json.loads(l) for l in (p.run_dir / "selected.jsonl").read_text().splitlines()]
    k = round(0.1 * len(p.pool))
    assert len(selected) == k
    top = scores.sort_values("nice", ascending=False)["id"].head(k).tolist()
    assert [r["id"] for r in selected] == top
    assert set(diag["method"]) == {"random", "pool", "less", "nice"}
    assert diag.loc[diag["method"] == "pool", "harmful_share"].item() == pytest.approx(
        sum(bool(r.columns["harmful"]) for r in p.pool) / len(p.pool))
    for epoch in (1, 2):
        ck = p.run_dir / "warmup" / f"epoch_{epoch}"
        assert (ck / "adapter" / "adapter_model.safetensors").exists()
        m = load_tensors(ck / "adam_moments.safetensors")
        assert m["exp_avg"].shape == m["exp_avg_sq"].shape and (m["exp_avg_sq"] >= 0).all()
        assert json.loads((ck / "state.json").read_text())["lr"] > 0


def test_vectors_are_unit_rows_with_their_projection_recorded(finished):
    p, _ = finished
    train, _, ids = p.load_vectors("train")
    assert ids == [r.id for r in p.pool]
    assert train[0].shape == (len(p.pool), 256)
    torch.testing.assert_close(train[0].norm(dim=1), torch.ones(len(p.pool)), rtol=0, atol=2e-3)  # float16 rows
    stored = p.stored_vectors("train")[0]
    assert (stored.path / "vectors.npy").stat().st_size < len(p.pool) * 256 * 2 + 1024 and (stored.norms > 0).all()  # float16
    spec = json.loads((p.run_dir / "grads" / "train" / "epoch_1" / "projection.json").read_text())
    assert spec["kind"] == "sjlt" and spec["dim"] == 256 and spec["input_dim"] > 0


def test_second_run_reuses_every_stage(finished, tokenizer, monkeypatch):
    p, _ = finished
    before = pd.read_csv(p.run_dir / "scores.csv")

    def boom(*a, **k):
        raise AssertionError("recomputed a cached stage")

    monkeypatch.setattr(stages_mod, "projected_gradients", boom)
    monkeypatch.setattr(stages_mod, "sample_rollouts", boom)
    monkeypatch.setattr(stages_mod, "train_lora", boom)
    again = Pipeline(p.cfg, p.run_dir, model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)
    again.run()
    pd.testing.assert_frame_equal(before, pd.read_csv(p.run_dir / "scores.csv"))


def test_interrupted_stage_resumes_from_its_last_chunk(tokenizer, small_data, tmp_path, monkeypatch):
    p = make(tokenizer, small_data, tmp_path / "r")
    p.warmup()
    calls = {"n": 0}
    real = stages_mod.projected_gradients

    per_chunk = 1  # projected_gradients calls per chunk

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * per_chunk + 1:  # the third chunk
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(stages_mod, "projected_gradients", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        p.train_gradients()
    stage = tmp_path / "r" / "grads" / "train" / "epoch_1"
    assert len(list(stage.glob("chunk_*.safetensors"))) == 2 and not (stage / "DONE").exists()
    calls["n"] = -100  # no more crashes; count what the resumed run computes
    p.train_gradients()
    n_chunks = -(-len(p.pool) // 8)
    assert calls["n"] == -100 + per_chunk * ((n_chunks - 2) + n_chunks)  # epoch 1 resumed, epoch 2 whole
    # identical to an uninterrupted run
    fresh = make(tokenizer, small_data, tmp_path / "fresh")
    fresh.warmup()
    fresh.train_gradients()
    torch.testing.assert_close(p.load_vectors("train")[0][0], fresh.load_vectors("train")[0][0], rtol=0, atol=0)


def test_shards_merge_to_exactly_the_unsharded_result(finished, tokenizer, small_data, tmp_path):
    p, _ = finished
    import shutil

    shutil.copytree(p.run_dir / "warmup", tmp_path / "s" / "warmup")
    sharded = Pipeline(p.cfg, tmp_path / "s", model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)
    sharded.train_gradients(shard=(1, 2))
    with pytest.raises(RuntimeError, match="not finished"):
        sharded.load_vectors("train")
    sharded.train_gradients(shard=(0, 2))
    for a, b in zip(sharded.load_vectors("train")[0], p.load_vectors("train")[0]):
        assert torch.equal(a, b)


def test_same_seed_same_scores(finished, tokenizer, small_data, tmp_path):
    p, _ = finished
    again = make(tokenizer, small_data, tmp_path / "again")
    again.run()
    pd.testing.assert_frame_equal(pd.read_csv(p.run_dir / "scores.csv"), pd.read_csv(tmp_path / "again" / "scores.csv"))


def test_changing_the_metric_rescores_rollouts_without_sampling(finished, tokenizer, monkeypatch):
    p, _ = finished
    before = p.rollouts()
    monkeypatch.setattr(stages_mod, "sample_rollouts", lambda *a, **k: (_ for _ in ()).throw(AssertionError("resampled")))
    cfg = tiny_config({"pool": p.cfg.data.pool, "target_val": p.cfg.data.target_val,
                       "target_test": p.cfg.data.target_test}, metric={"name": "length", "params": {"max_words": 1}})
    q = Pipeline(cfg, p.run_dir, model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)
    after = q.rollouts()
    assert after["completion"].tolist() == before["completion"].tolist()
    expected = [1.0 if len(c.split()) <= 1 else max(0.0, 2 - len(c.split())) for c in after["completion"]]
    assert after["reward"].tolist() == expected


def test_mixing_projections_is_an_error(finished, tokenizer, tmp_path):
    p, _ = finished
    import shutil

    shutil.copytree(p.run_dir, tmp_path / "m")
    cfg = tiny_config({"pool": p.cfg.data.pool, "target_val": p.cfg.data.target_val,
                       "target_test": p.cfg.data.target_test}, projection={"dim": 256, "seed": 99})
    q = Pipeline(cfg, tmp_path / "m", model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)
    # the stored vectors name the setting that changed (before any comparison across projections)
    with pytest.raises(pipeline_mod.StaleResultError, match="projection.seed: 0 -> 99"):
        q.load_vectors("train")


def test_label_free_run_needs_no_reference_anywhere(tokenizer, small_data, tmp_path):
    from nice_kit.data import load_records, save_records

    unlabeled = tmp_path / "val_unlabeled.jsonl"
    recs = load_records(small_data["target_val"])
    for r in recs:
        r.response = None
        r.columns = {"task": r.columns["task"]}
    save_records(recs, unlabeled)
    data = {**small_data, "target_val": str(unlabeled), "target_test": str(unlabeled), "label_free": True}
    p = make(tokenizer, data, tmp_path / "lf", metric={"name": "length", "params": {"max_words": 2}},
             rollouts={"k": 4, "max_new_tokens": 4, "temperature": 1.5})
    diag = p.run()
    scores = pd.read_csv(tmp_path / "lf" / "scores.csv")
    assert list(scores.columns) == ["id", "nice"] and scores["nice"].notna().all()
    assert set(diag["method"]) == {"random", "pool", "nice"}
    with pytest.raises(ValueError, match="LESS needs reference answers"):
        p.validation_gradients("less")
    from nice_kit.config import ConfigError

    with pytest.raises(ConfigError, match="label-free mode withholds reference answers"):
        make(tokenizer, data, tmp_path / "lf2", metric={"name": "task_score", "params": {}})


def test_prompts_without_signal_are_reported_not_nan(finished):
    p, _ = finished
    notes = json.loads((p.run_dir / "grads" / "val_nice" / "epoch_1" / "notes.json").read_text())
    assert set(notes) == {r.id for r in p.target_val}
    for pid, n in notes.items():
        assert isinstance(n["signal"], bool)
        if not n["signal"]:
            assert n["note"]
    valid = p.stored_vectors("nice")[0].valid
    assert valid.tolist() == [notes[r.id]["signal"] for r in p.target_val]


def count_vowels(prompts, completions, **columns):
    return [float(sum(ch in "aeiou" for ch in c)) for c in completions]


def test_a_user_function_is_a_metric_and_its_rewards_are_cached(finished, tokenizer, monkeypatch):
    p, _ = finished
    cfg = tiny_config({"pool": p.cfg.data.pool, "target_val": p.cfg.data.target_val,
                       "target_test": p.cfg.data.target_test})
    cfg.metric.name, cfg.metric.params = count_vowels, {}
    q = Pipeline(cfg, p.run_dir, model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)
    df = q.rollouts()
    assert df["reward"].tolist() == count_vowels([], df["completion"].tolist())
    monkeypatch.setattr(stages_mod.metrics_mod, "score", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert q.rollouts()["reward"].tolist() == df["reward"].tolist()  # read back, not re-scored


def test_a_finished_run_reopens_without_loading_the_model(finished, tokenizer, monkeypatch):
    p, _ = finished
    monkeypatch.setattr(models_mod, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    again = Pipeline(p.cfg, p.run_dir, tokenizer=tokenizer, verbose=False)
    diag = again.run()
    assert set(diag["method"]) == {"random", "pool", "less", "nice"}
