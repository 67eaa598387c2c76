import json

import torch

from nice_kit.data import load_records, tokenize_records
from nice_kit.models import LoraSettings, add_lora, lora_parameters, tiny_model
from nice_kit.warmup import load_checkpoints, train_lora


def _train(tokenizer, small_data, out_dir, epochs):
    model = add_lora(tiny_model(tokenizer), LoraSettings(r=4, alpha=8), seed=0)
    ex, _ = tokenize_records(tokenizer, load_records(small_data["pool"])[:12], 64)
    ck = train_lora(model, ex, epochs=epochs, lr=1e-2, batch_size=4, pad_id=tokenizer.pad_token_id, seed=0,
                    out_dir=out_dir)
    return model, ck


def test_checkpoints_hold_adapter_moments_and_mean_lr(tokenizer, small_data, tmp_path):
    model, ck = _train(tokenizer, small_data, tmp_path, epochs=2)
    assert [c.epoch for c in ck] == [1, 2]
    assert ck[0].lr > ck[1].lr > 0  # linear decay; each checkpoint records its epoch's mean lr
    m, v = ck[1].moments()
    n = sum(p.numel() for _, p in lora_parameters(model))
    assert m.shape == v.shape == (n,) and m.abs().sum() > 0
    assert json.loads((ck[1].path / "state.json").read_text())["train_loss"] > 0


def test_resumed_warmup_equals_an_uninterrupted_one(tokenizer, small_data, tmp_path):
    _train(tokenizer, small_data, tmp_path / "a", epochs=2)
    # "interrupted" after epoch 1: train 1 of 2 epochs into b, then resume with epochs=2
    _train(tokenizer, small_data, tmp_path / "b", epochs=2)
    import shutil

    shutil.rmtree(tmp_path / "b" / "epoch_2")
    model_b, ck_b = _train(tokenizer, small_data, tmp_path / "b", epochs=2)
    a, b = load_checkpoints(tmp_path / "a")[1], ck_b[1]
    for x, y in zip(a.moments(), b.moments()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert a.lr == b.lr
