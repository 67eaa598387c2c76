import pytest
import torch

import nice_kit.models as models
from nice_kit.models import LoraSettings, add_lora, cache_dir, choose_threads, default_model_path, load_model, lora_parameters


def test_any_local_hugging_face_path_loads(tiny_model_dir, tokenizer):
    model, tok = load_model(str(tiny_model_dir))
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert len(tok) == len(tokenizer) and model.config.vocab_size == len(tokenizer)


def test_default_model_is_converted_once_and_reloaded_from_the_cache(tokenizer, monkeypatch):
    path = default_model_path()  # converted by the tokenizer fixture at the latest
    assert (path / "model.safetensors").exists()
    import transformers

    def no_conversion(*a, **k):
        raise AssertionError("converted the GGUF again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert default_model_path() == path
    monkeypatch.undo()
    model, tok = load_model("SmolLM2-135M-Instruct")
    assert "quantization_config" not in model.config.to_dict()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)


def test_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NICE_KIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    ready = tmp_path / "models" / models.DEFAULT_MODEL
    ready.mkdir(parents=True)
    (ready / "config.json").write_text("{}")
    (ready / "model.safetensors").write_text("")
    assert default_model_path() == ready


def test_lora_wrapping_and_thread_choice(tokenizer):
    model = add_lora(models.tiny_model(tokenizer), LoraSettings(r=2, alpha=4))
    names = [n for n, _ in lora_parameters(model)]
    assert names and all("lora_" in n for n in names) and len(names) == 2 * 4 * 2  # A,B x q,k,v,o x 2 layers
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    before = torch.get_num_threads()
    try:
        n, timings = choose_threads(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [1, 2], repeats=1)
        assert n in (1, 2) and set(timings) == {1, 2} and torch.get_num_threads() == n
        assert timings[n] == min(timings.values())
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------
# Offline only: nothing is ever downloaded (issue 7 item 21)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test; the offline flags are restored afterwards."""
    import socket

    from huggingface_hub import constants

    def refuse(*a, **k):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_an_unknown_model_name_fails_at_once_naming_what_works_offline(no_network, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for load in (load_model, models.load_tokenizer):
        with pytest.raises(models.ModelNotAvailable) as err:
            load("some-org/some-model-7b")
        msg = str(err.value)
        assert "'some-org/some-model-7b' is neither a local folder nor a model in the local Hugging Face cache" in msg
        assert "never downloads" in msg and "names that work offline: SmolLM2-135M-Instruct" in msg
        assert f"models in the Hugging Face cache {tmp_path / 'hub'}: none" in msg


def test_a_missing_or_incomplete_local_model_folder(no_network, tmp_path):
    with pytest.raises(models.ModelNotAvailable, match=f"{tmp_path / 'nowhere'}: no such model folder"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelNotAvailable, match="no config.json in this folder"):
        models.check_model(str(tmp_path / "empty"))
    models.check_model("default")  # the bundled default needs nothing from the network


def test_a_model_in_the_hugging_face_cache_loads_offline(no_network, tiny_model_dir, tmp_path, monkeypatch):
    import os
    import shutil

    from huggingface_hub import constants

    hub = tmp_path / "hub"
    repo = hub / "models--some-org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert models.cached_models() == ["some-org/tiny"]
    assert models.resolve_model_path("some-org/tiny") == str(repo / "snapshots" / "0123abc")
    model, tok = load_model("some-org/tiny")
    assert model.config.vocab_size == len(tok)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True  # offline from here on
    with pytest.raises(models.ModelNotAvailable, match="models in the Hugging Face cache .*: some-org/tiny"):
        models.check_model("some-org/other")


def test_a_folder_holding_only_a_tokenizer_loads_as_a_tokenizer(tokenizer, tmp_path):
    """What ``tokenizer.save_pretrained`` writes (no config.json): a tokenizer, not a model."""
    from nice_kit.models import ModelNotAvailable, load_tokenizer

    tokenizer.save_pretrained(tmp_path / "tok")
    assert not (tmp_path / "tok" / "config.json").exists()
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded("2 + 2 = 4")["input_ids"] == tokenizer("2 + 2 = 4")["input_ids"]
    assert loaded.pad_token_id == tokenizer.pad_token_id
    with pytest.raises(ModelNotAvailable, match="config.json"):  # still not a model
        load_model(str(tmp_path / "tok"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailable, match="config.json"):  # neither a model nor a tokenizer
        load_tokenizer(str(tmp_path / "empty"))
