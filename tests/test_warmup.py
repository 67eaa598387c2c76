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


def test_saved_moments_equal_a_real_adamw_step_parameter_by_parameter(tokenizer, small_data, tmp_path):
    """exp_avg / exp_avg_sq on disk are torch.optim.AdamW's state, flattened in lora_parameters order."""
    from nice_kit.data import collate

    def model_with_nonzero_lora():
        model = add_lora(tiny_model(tokenizer), LoraSettings(r=4, alpha=8, dropout=0.0), seed=0)
        torch.manual_seed(0)
        for _, p in lora_parameters(model):  # non-zero B, so every parameter gets a non-zero gradient
            torch.nn.init.normal_(p, std=0.05)
        return model

    ex, _ = tokenize_records(tokenizer, load_records(small_data["pool"])[:6], 64)
    model = model_with_nonzero_lora()
    ck = train_lora(model, ex, epochs=1, lr=1e-2, batch_size=len(ex), pad_id=tokenizer.pad_token_id, seed=0,
                    out_dir=tmp_path)  # one batch: one optimizer step
    saved_m, saved_v = ck[0].moments()

    ref = model_with_nonzero_lora()
    ref.train()
    params = [p for _, p in lora_parameters(ref)]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ref(**collate(ex, tokenizer.pad_token_id)).loss.backward()
    opt.step()

    assert saved_m.numel() == sum(p.numel() for p in params)
    offset = 0
    for (name, _), p in zip(lora_parameters(ref), params):
        n = p.numel()
        state = opt.state[p]
        assert state["exp_avg"].abs().max() > 0, name
        torch.testing.assert_close(saved_m[offset:offset + n], state["exp_avg"].reshape(-1).float(),
                                   rtol=1e-4, atol=1e-6 * state["exp_avg"].abs().max().item(), msg=name)
        torch.testing.assert_close(saved_v[offset:offset + n], state["exp_avg_sq"].reshape(-1).float(),
                                   rtol=1e-4, atol=1e-6 * state["exp_avg_sq"].abs().max().item(), msg=name)
        offset += n
    # and the trained adapter is AdamW's step too (same model, batch and optimizer)
    for (name, p), (_, q) in zip(lora_parameters(model), lora_parameters(ref)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
