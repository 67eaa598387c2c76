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
