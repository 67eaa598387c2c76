import torch

from nice_kit.data import tokenize_pair
from nice_kit.gradients import (WeightedSequence, adam_precondition, gradient_dim, group_gradients, loop_gradients,
                                mean_nll_sequence)
from nice_kit.models import LoraSettings, add_lora, lora_parameters, tiny_model

PAIRS = [("What is 2+2?", "4"), ("Name a colour.", "Blue is a fine colour."), ("hi", "hello there, friend"),
         ("7*8?", "56"), ("Spell cat backwards.", "tac")]


def _lora_model(tokenizer, seed=0):
    model = add_lora(tiny_model(tokenizer, seed=seed), LoraSettings(r=4, alpha=8, dropout=0.1), seed=seed)
    torch.manual_seed(seed)
    for _, p in lora_parameters(model):  # non-zero B so that A's gradient is non-zero too
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_batched_equals_one_example_loop(tokenizer):
    model = _lora_model(tokenizer)
    seqs = [mean_nll_sequence(tokenize_pair(tokenizer, [{"role": "user", "content": q}], a, 64), i)
            for i, (q, a) in enumerate(PAIRS)]
    batched = group_gradients(model, seqs, len(seqs), tokenizer.pad_token_id, batch_size=3)
    looped = loop_gradients(model, seqs, len(seqs))
    assert batched.shape == (len(PAIRS), gradient_dim(model))
    assert looped.abs().max() > 1e-3
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for _, p in lora_parameters(model))


def test_groups_sum_weighted_sequences(tokenizer):
    """Several sequences in one group (a target prompt's rollouts) with arbitrary per-token weights."""
    model = _lora_model(tokenizer, seed=1)
    seqs = []
    for i, (q, a) in enumerate(PAIRS):
        t = tokenize_pair(tokenizer, [{"role": "user", "content": q}], a, 64)
        w = [0.0 if l < 0 else (0.5 - i) for l in t.labels]  # negative and positive rewards
        seqs.append(WeightedSequence(t.input_ids, w, group=i % 2))
    batched = group_gradients(model, seqs, 2, tokenizer.pad_token_id, batch_size=2)
    torch.testing.assert_close(batched, loop_gradients(model, seqs, 2), rtol=1e-5, atol=1e-7)


def test_batch_size_does_not_change_results_beyond_fp32(tokenizer):
    model = _lora_model(tokenizer, seed=2)
    seqs = [mean_nll_sequence(tokenize_pair(tokenizer, [{"role": "user", "content": q}], a, 64), i)
            for i, (q, a) in enumerate(PAIRS)]
    a = group_gradients(model, seqs, len(seqs), tokenizer.pad_token_id, batch_size=1)
    b = group_gradients(model, seqs, len(seqs), tokenizer.pad_token_id, batch_size=5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_adam_preconditioning_formula():
    g = torch.tensor([[1.0, -2.0, 0.0]])
    m, v = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1.0, 4.0, 0.0])
    out = adam_precondition(g, m, v)
    m2 = 0.9 * m + 0.1 * g
    v2 = 0.999 * v + 0.001 * g ** 2
    torch.testing.assert_close(out, m2 / torch.sqrt(v2 + 1e-8))
