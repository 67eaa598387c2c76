from nice_kit.demo import demo_config, fast_mode


def test_fast_mode_replaces_the_metric_and_slices_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv("NICE_KIT_FAST", raising=False)
    assert not fast_mode()
    monkeypatch.setenv("NICE_KIT_FAST", "1")
    assert fast_mode() and not fast_mode(False)
    cfg = demo_config(tmp_path)
    assert cfg.metric.name == "length" and cfg.metric.params == {"max_words": 3}
    assert cfg.data.pool.startswith(str(tmp_path)) and cfg.threads == 1
    over = demo_config(tmp_path, metric={"name": "format", "params": {}}, data={"label_free": True})
    assert over.metric.params == {} and over.data.label_free and over.data.pool == cfg.data.pool


def test_full_mode_is_the_bundled_default(tmp_path):
    cfg = demo_config(tmp_path, fast=False)
    assert cfg.model == "SmolLM2-135M-Instruct" and cfg.data.pool.endswith("data/arith/pool.jsonl")
    assert cfg.metric.params == {"extract": "strict"}
