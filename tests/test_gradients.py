import copy

import pytest
import torch

import nice_kit.gradients as gradients_mod
from nice_kit.data import prompt_ids, tokenize_pair
from nice_kit.gradients import (BatchSize, WeightedSequence, adam_precondition, gradient_dim, group_gradients, loop_gradients,
                                mean_nll_sequence, projected_gradients)
from nice_kit.models import LoraSettings, add_lora, lora_parameters, tiny_model
from test_memory import OUT_OF_MEMORY_ERRORS

PAIRS = [("What is 2+2?", "4"), ("Name a colour.", "Blue is a fine colour."), ("hi", "hello there, friend"),
         ("7*8?", "56"), ("Spell cat backwards.", "tac")]


def _lora_model(tokenizer, seed=0, **lora):
    model = add_lora(tiny_model(tokenizer, seed=seed), LoraSettings(r=4, alpha=8, dropout=0.1, **lora), seed=seed)
    torch.manual_seed(seed)
    for _, p in lora_parameters(model):  # non-zero B so that A's gradient is non-zero too
        torch.nn.init.normal_(p, std=0.05)
    return model


def _training_seqs(tokenizer):
    return [mean_nll_sequence(tokenize_pair(tokenizer, [{"role": "user", "content": q}], a, 64), i)
            for i, (q, a) in enumerate(PAIRS)]


def _nice_groups(tokenizer):
    """NICE-style groups: K completions of one prompt with different rewards (some zero, negative, equal
    completions), different lengths, the reference answer in the same group, a group with two prompts,
    a group with one completion and a group without any sequence (index 3)."""
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for g, (q, a) in enumerate(PAIRS[:3]):
        p = prompt_ids(tokenizer, [{"role": "user", "content": q}])
        for k in range(6):
            n = 1 + k % 4
            comp = torch.randint(200, 5000, (n,), generator=gen).tolist()
            if k == 5:
                comp = list(seqs[-1].input_ids[len(p):])  # a completion sampled twice
                n = len(comp)
            w = [0.0, 0.7, -0.4, 1.3, -0.9, 0.25][k] / n
            seqs.append(WeightedSequence(p + comp, [0.0] * len(p) + [w] * n, g))
        ref = mean_nll_sequence(tokenize_pair(tokenizer, [{"role": "user", "content": q}], a, 64), g)
        ref.weights = [0.5 * x for x in ref.weights]
        seqs.append(ref)
    p = prompt_ids(tokenizer, [{"role": "user", "content": PAIRS[3][0]}])
    p2 = prompt_ids(tokenizer, [{"role": "user", "content": PAIRS[4][0]}])
    seqs += [WeightedSequence(p + [400, 401], [0.0] * len(p) + [1.0, 1.0], 1),  # a second prompt in group 1
             WeightedSequence(p + [402], [0.0] * len(p) + [-2.0], 1),
             WeightedSequence(p2 + [403, 404, 405], [0.0] * len(p2) + [0.3, 0.3, 0.3], 4)]
    return seqs, 5


def _independent_gradients(model, seqs, n_groups):
    """Shares nothing with nice_kit.gradients: a float64 copy of the model, each sequence alone through
    its plain forward, log_softmax + gather written here, torch.autograd.grad over the LoRA parameters."""
    ref = copy.deepcopy(model).double()
    ref.eval()
    params = [p for _, p in lora_parameters(ref)]
    out = torch.zeros(n_groups, sum(p.numel() for p in params), dtype=torch.float64)
    for s in seqs:
        ids = torch.tensor(s.input_ids)
        logp = torch.log_softmax(ref(input_ids=ids[None]).logits[0, :-1], dim=-1)
        token_logp = logp.gather(1, ids[1:, None])[:, 0]
        loss = -(torch.tensor(s.weights[1:], dtype=torch.float64) * token_logp).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out[s.group] += torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if g is None else g.reshape(-1)
                                   for p, g in zip(params, grads)])
    return out


def _assert_fp32_close(got, want):
    """Equal to fp32 precision: relative to the largest entry (summation order differs per batch)."""
    want = want.to(torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_batched_equals_one_example_loop(tokenizer):
    model = _lora_model(tokenizer)
    seqs = _training_seqs(tokenizer)
    batched = group_gradients(model, seqs, len(seqs), tokenizer.pad_token_id, batch_size=3)
    looped = loop_gradients(model, seqs, len(seqs))
    assert batched.shape == (len(PAIRS), gradient_dim(model))
    assert looped.abs().max() > 1e-3
    _assert_fp32_close(batched, looped)
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
    _assert_fp32_close(batched, loop_gradients(model, seqs, 2))


def test_batch_size_does_not_change_results_beyond_fp32(tokenizer):
    model = _lora_model(tokenizer, seed=2)
    seqs = _training_seqs(tokenizer)
    a = group_gradients(model, seqs, len(seqs), tokenizer.pad_token_id, batch_size=1)
    b = group_gradients(model, seqs, len(seqs), tokenizer.pad_token_id, batch_size=5)
    _assert_fp32_close(a, b)


@pytest.mark.parametrize("kind", ["training", "less", "nice"])
def test_gradients_equal_an_independent_float64_autograd(tokenizer, small_data, kind):
    from nice_kit.data import load_records

    model = _lora_model(tokenizer, seed=3)
    if kind == "training":
        seqs, n = _training_seqs(tokenizer), len(PAIRS)
    elif kind == "less":  # reference answers of the target prompts
        recs = load_records(small_data["target_val"])
        seqs = [mean_nll_sequence(tokenize_pair(tokenizer, r.messages, r.response, 64), j) for j, r in enumerate(recs)]
        n = len(recs)
    else:
        seqs, n = _nice_groups(tokenizer)
    want = _independent_gradients(model, seqs, n)
    assert want.abs().max() > 1e-3
    for batch_size in (1, 3, 8):
        _assert_fp32_close(group_gradients(model, seqs, n, tokenizer.pad_token_id, batch_size=batch_size), want)
    _assert_fp32_close(loop_gradients(model, seqs, n), want)
    got = projected_gradients(model, seqs, n, tokenizer.pad_token_id, project=lambda g: g, batch_size=2)
    assert got.device.type == "cpu" and got.dtype == torch.float32
    _assert_fp32_close(got, want)


def test_nice_groups_share_their_prompt_and_equal_the_loop(tokenizer):
    model = _lora_model(tokenizer, seed=4)
    seqs, n = _nice_groups(tokenizer)
    units = gradients_mod._plan(seqs)
    shared = [u for u in units if u.prefix]
    # groups 0, 1 and 2 share their prompt (group 1 also its second prompt); group 4 has a single sequence
    assert sorted(u.group for u in shared) == [0, 1, 1, 2]
    g0 = next(u for u in shared if u.group == 0)
    p0 = prompt_ids(tokenizer, [{"role": "user", "content": PAIRS[0][0]}])
    # the prompt's last token stays in every continuation: its hidden state predicts the first weighted token
    assert g0.prefix == p0[:-1]
    assert all(ids[0] == p0[-1] and len(ids) >= 2 and w[0] == 0 for ids, w in g0.rows)
    # 7 sequences: the zero-weight one is dropped, the duplicate merged into its twin
    assert len(g0.rows) == 5
    assert gradients_mod._model_parts(model).cache_arg is not None  # the tiny Llama runs the shared path

    looped = loop_gradients(model, seqs, n)
    batched = group_gradients(model, seqs, n, tokenizer.pad_token_id, batch_size=4)
    unshared = group_gradients(model, seqs, n, tokenizer.pad_token_id, batch_size=4, share_prefixes=False)
    _assert_fp32_close(batched, looped)
    _assert_fp32_close(unshared, looped)
    assert batched[3].abs().max() == 0  # a group without sequences


def test_forward_passes_hold_at_most_batch_size_whole_sequences(tokenizer):
    seqs, _ = _nice_groups(tokenizer)
    units = gradients_mod._plan(seqs) + gradients_mod._plan(_training_seqs(tokenizer))
    for batch_size in (1, 2, 3, 8):
        batches = gradients_mod._forward_batches(units, batch_size)
        rows = sorted((u.group, tuple(u.prefix + ids)) for b in batches for u in b for ids, _ in u.rows)
        assert rows == sorted((u.group, tuple(u.prefix + ids)) for u in units for ids, _ in u.rows)
        for b in batches:
            assert len({bool(u.prefix) for u in b}) == 1  # shared and unshared units never mix
            longest = max(len(u.prefix) + len(ids) for u in b for ids, _ in u.rows)
            assert gradients_mod._pass_tokens(b) <= batch_size * longest
            if not b[0].prefix:
                assert sum(len(u.rows) for u in b) <= batch_size
    # short completions of shared prompts: several prompts run in one pass
    assert max(len(b) for b in gradients_mod._forward_batches(units, 8) if b[0].prefix) > 1


def test_plan_merges_duplicates_drops_zero_weights_and_trims():
    seqs = [WeightedSequence([1, 2, 3, 4, 5], [0, 0, 0, 0.5, 0], 0),
            WeightedSequence([1, 2, 3, 4, 5], [0, 0, 0, 0.25, 0], 0),  # duplicate: weights add
            WeightedSequence([1, 2, 3, 6], [0, 0, 0, 1.0], 0),
            WeightedSequence([1, 2, 3, 7], [0, 0, 0, 0.0], 0),  # no weight: contributes nothing
            WeightedSequence([1, 2, 3, 8], [0, 0, 0, 1.0], 1)]  # same prompt, other group: not shared
    units = gradients_mod._plan(seqs)
    assert len(units) == 2
    shared = next(u for u in units if u.group == 0)
    assert shared.prefix == [1, 2]
    assert shared.rows == [([3, 4], [0.0, 0.75]), ([3, 6], [0.0, 1.0])]  # the trailing 5 carries no weight
    alone = next(u for u in units if u.group == 1)
    assert alone.prefix == [] and alone.rows == [([1, 2, 3, 8], [0.0, 0.0, 0.0, 1.0])]


def test_logits_only_at_weighted_positions(tokenizer):
    model = _lora_model(tokenizer, seed=5)
    seqs = _training_seqs(tokenizer)
    head = gradients_mod._model_parts(model).head
    rows = []
    handle = head.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        group_gradients(model, seqs, len(seqs), tokenizer.pad_token_id, batch_size=8)
    finally:
        handle.remove()
    # one pass of 5 sequences: the head runs on their response positions only, not on every token
    n_weighted = sum(1 for s in seqs for w in s.weights[1:] if w != 0)
    assert rows == [n_weighted]
    assert n_weighted < sum(len(s.input_ids) - 1 for s in seqs) / 3


def test_full_logits_fallback_gives_the_same_gradients(tokenizer, monkeypatch):
    model = _lora_model(tokenizer, seed=6)
    seqs, n = _nice_groups(tokenizer)
    want = loop_gradients(model, seqs, n)
    monkeypatch.setitem(gradients_mod._PARTS, model, gradients_mod._ModelParts())
    _assert_fp32_close(group_gradients(model, seqs, n, tokenizer.pad_token_id, batch_size=3), want)


@pytest.mark.filterwarnings("ignore:Model has .tie_word_embeddings=True.")
def test_lora_on_the_output_head(tokenizer):
    """The head's own LoRA layers see only the gathered positions; their rows still map to groups."""
    model = _lora_model(tokenizer, seed=7, target_modules=["q_proj", "v_proj", "lm_head"])
    assert any("lm_head" in name for name, _ in lora_parameters(model))
    seqs, n = _nice_groups(tokenizer)
    _assert_fp32_close(group_gradients(model, seqs, n, tokenizer.pad_token_id, batch_size=4),
                       _independent_gradients(model, seqs, n))


def test_layer_inputs_are_released_as_backward_reaches_them(tokenizer, monkeypatch):
    """Each LoRA layer's input is dropped when its gradient is formed: the number held falls by one per
    layer during backward, and no output gradient is ever stored."""
    model = _lora_model(tokenizer, seed=8)
    seqs = _training_seqs(tokenizer)
    held = []
    original = gradients_mod._PerExampleRecorder._add

    def spy(self, *args):
        held.append(self.pending())
        return original(self, *args)

    monkeypatch.setattr(gradients_mod._PerExampleRecorder, "_add", spy)
    group_gradients(model, seqs, len(seqs), tokenizer.pad_token_id, batch_size=8)
    n_layers = len(lora_parameters(model))
    assert held == list(range(n_layers - 1, -1, -1))


def test_projected_gradients_transform_and_projection(tokenizer):
    from nice_kit.projection import ProjectionSpec, Projector

    model = _lora_model(tokenizer, seed=9)
    seqs, n = _nice_groups(tokenizer)
    D = gradient_dim(model)
    m, v = torch.rand(D), torch.rand(D)
    projector = Projector(ProjectionSpec(kind="sjlt", dim=64, seed=0, nnz=2, input_dim=D))
    got = projected_gradients(model, seqs, n, tokenizer.pad_token_id, projector.project,
                              transform=lambda g: adam_precondition(g, m, v), batch_size=2)
    full = adam_precondition(loop_gradients(model, seqs, n), m, v)
    want = projector.project(full)
    want[3] = 0  # the group without sequences stays zero, although adam_precondition(0) is not
    assert got.shape == (n, 64)
    _assert_fp32_close(got, want)
    empty = projected_gradients(model, [], 3, tokenizer.pad_token_id, projector.project)
    assert empty.shape == (3, 64) and empty.abs().max() == 0


@pytest.mark.parametrize("kind", sorted(OUT_OF_MEMORY_ERRORS))
def test_out_of_memory_lowers_the_batch_size_and_retries(tokenizer, monkeypatch, kind):
    error = OUT_OF_MEMORY_ERRORS[kind]
    model = _lora_model(tokenizer, seed=10)
    seqs, n = _nice_groups(tokenizer)
    want = group_gradients(model, seqs, n, tokenizer.pad_token_id, batch_size=4)
    # a fake allocator limit: passes larger than those of batch size 2 do not fit (and some at 4 and 8 are larger)
    units = gradients_mod._plan(seqs)
    limit = max(gradients_mod._pass_tokens(b) for b in gradients_mod._forward_batches(units, 2))
    assert max(gradients_mod._pass_tokens(b) for b in gradients_mod._forward_batches(units, 4)) > limit
    original = gradients_mod._run_batch
    sizes = []

    def limited(model_, parts, batch, *args):
        tokens = gradients_mod._pass_tokens(batch)
        sizes.append(tokens)
        if tokens > limit:
            raise error()
        return original(model_, parts, batch, *args)

    monkeypatch.setattr(gradients_mod, "_run_batch", limited)
    messages = []
    got = group_gradients(model, seqs, n, tokenizer.pad_token_id, batch_size=8, log=messages.append)
    _assert_fp32_close(got, want)
    assert messages == ["out of memory at gradient batch size 8; continuing with batch size 4",
                        "out of memory at gradient batch size 4; continuing with batch size 2"]
    assert sum(s > limit for s in sizes) == 2  # one failure per size: the lowered size is kept

    messages.clear()
    size = BatchSize(4)  # one object for a whole stage: the lowered size carries over to later calls
    for _ in range(2):
        proj = projected_gradients(model, seqs, n, tokenizer.pad_token_id, lambda g: g, batch_size=size,
                                   log=messages.append)
        _assert_fp32_close(proj, want.cpu())
    assert messages == ["out of memory at gradient batch size 4; continuing with batch size 2"]
    assert size.value == 2


@pytest.mark.parametrize("kind", sorted(OUT_OF_MEMORY_ERRORS))
def test_out_of_memory_inside_the_models_forward_leaves_no_trace(tokenizer, kind):
    """The error comes from the last decoder layer, after the LoRA layers below it have kept their
    inputs for the backward pass: the retried batches still give the uninjected gradients."""
    model = _lora_model(tokenizer, seed=12)
    seqs, n = _nice_groups(tokenizer)
    layer = model.get_base_model().model.layers[-1]
    positions: list[int] = []

    def record(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        positions.append(x.shape[0] * x.shape[1])

    def passes(batch_size: int) -> tuple[torch.Tensor, list[int]]:
        positions.clear()
        handle = layer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            return group_gradients(model, seqs, n, tokenizer.pad_token_id, batch_size=batch_size), list(positions)
        finally:
            handle.remove()

    want, at_8 = passes(8)
    _, at_1 = passes(1)
    limit = max(at_1)  # a fake allocator limit: batch size 1 fits, batch size 8 does not
    assert max(at_8) > limit

    def limited(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if x.shape[0] * x.shape[1] > limit:
            raise OUT_OF_MEMORY_ERRORS[kind]()

    messages: list[str] = []
    handle = layer.register_forward_pre_hook(limited, with_kwargs=True)
    try:
        got = group_gradients(model, seqs, n, tokenizer.pad_token_id, batch_size=8, log=messages.append)
        proj = projected_gradients(model, seqs, n, tokenizer.pad_token_id, lambda g: g, batch_size=8,
                                   log=messages.append)
    finally:
        handle.remove()
    _assert_fp32_close(got, want)
    _assert_fp32_close(proj, want.cpu())
    assert messages and all(m.startswith("out of memory at gradient batch size ") for m in messages)
    assert all(p.grad is None for _, p in lora_parameters(model))


def test_out_of_memory_at_batch_size_one_and_other_errors_propagate(tokenizer, monkeypatch):
    model = _lora_model(tokenizer, seed=11)
    model.train()
    seqs = _training_seqs(tokenizer)

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gradients_mod, "_run_batch", oom)
    messages = []
    with pytest.raises(torch.OutOfMemoryError):
        group_gradients(model, seqs, len(seqs), tokenizer.pad_token_id, batch_size=2, log=messages.append)
    assert messages == ["out of memory at gradient batch size 2; continuing with batch size 1"]

    def broken(*args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(gradients_mod, "_run_batch", broken)
    messages.clear()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        group_gradients(model, seqs, len(seqs), tokenizer.pad_token_id, batch_size=4, log=messages.append)
    assert messages == []
    assert model.training  # the caller's mode is restored after a failure
    assert all(p.grad is None for _, p in lora_parameters(model))


def test_bad_groups_and_weights_are_named(tokenizer):
    model = _lora_model(tokenizer)
    with pytest.raises(ValueError, match="sequence 1: group 2 is outside 0..1"):
        group_gradients(model, [WeightedSequence([1, 2], [0, 1], 0), WeightedSequence([1, 2], [0, 1], 2)], 2, 0)
    with pytest.raises(ValueError, match="sequence 0: 1 weights for 2 tokens"):
        projected_gradients(model, [WeightedSequence([1, 2], [0], 0)], 1, 0, lambda g: g)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        group_gradients(model, [WeightedSequence([1, 2], [0, 1], 0)], 1, 0, batch_size=0)


def test_adam_preconditioning_formula():
    g = torch.tensor([[1.0, -2.0, 0.0]])
    m, v = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1.0, 4.0, 0.0])
    out = adam_precondition(g, m, v)
    m2 = 0.9 * m + 0.1 * g
    v2 = 0.999 * v + 0.001 * g ** 2
    torch.testing.assert_close(out, m2 / torch.sqrt(v2 + 1e-8))


# ------------------------------------------------------------------------------------------------
# Fewer passes and tensor cores (GPU paths checked on the CPU)


def test_no_batch_summed_lora_gradient_is_computed(tokenizer):
    """Backward runs only as far as the per-example gradients need: the LoRA weights' own (batch-summed)
    gradients are never formed, and the results still equal one-at-a-time backward passes."""
    model = _lora_model(tokenizer, seed=4)
    seqs, n = _nice_groups(tokenizer)
    want = loop_gradients(model, seqs, n)
    calls = []
    handles = [p.register_hook(lambda g, name=name: calls.append(name)) for name, p in lora_parameters(model)]
    try:
        got = group_gradients(model, seqs, n, tokenizer.pad_token_id, batch_size=3)
        proj = projected_gradients(model, seqs, n, tokenizer.pad_token_id, lambda g: g, batch_size=2)
    finally:
        for h in handles:
            h.remove()
    assert calls == []  # a hook on a parameter fires whenever its gradient is computed
    assert all(p.grad is None for _, p in lora_parameters(model))
    for mine in (got, proj):
        err = (mine - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-30)
        assert err.max() < 1e-4


def test_adam_precondition_in_blocks_and_in_place_equals_the_formula(monkeypatch):
    monkeypatch.setattr(gradients_mod, "_ADAM_BLOCK", 7)  # several blocks and a partial last one
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 40, generator=gen) * 1e-3
    m = torch.randn(40, generator=gen) * 1e-3
    v = torch.rand(40, generator=gen) * 1e-6
    formula = (0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g.pow(2) + 1e-8)
    copy_in = g.clone()
    out = adam_precondition(copy_in, m, v)
    assert torch.equal(copy_in, g)  # not in place: the input is left alone
    torch.testing.assert_close(out, formula, rtol=1e-6, atol=0)
    inplace = g.clone()
    res = adam_precondition(inplace, m, v, inplace=True)
    assert res.data_ptr() == inplace.data_ptr()
    torch.testing.assert_close(inplace, formula, rtol=1e-6, atol=0)


def test_bf16_products_with_fp32_accumulation_agree_with_fp32(tokenizer, monkeypatch):
    """The CUDA path (bf16 inputs, fp32 accumulation) run on the CPU: within bf16 rounding of fp32."""
    model = _lora_model(tokenizer, seed=5)
    seqs, n = _nice_groups(tokenizer)
    exact = group_gradients(model, seqs, n, tokenizer.pad_token_id, batch_size=3)
    monkeypatch.setattr(gradients_mod, "_FAST_PRODUCTS", True)
    fast = group_gradients(model, seqs, n, tokenizer.pad_token_id, batch_size=3)
    rows = exact.norm(dim=1) > 0
    err = (fast - exact)[rows].norm(dim=1) / exact[rows].norm(dim=1)
    assert 0 < err.max() < 2e-2  # rounded (so the path ran), and by no more than bf16 allows
    cos = torch.nn.functional.cosine_similarity(fast[rows], exact[rows], dim=1)
    assert cos.min() > 0.9995
    # the products alone, per example and for a single group
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(4, 5, 6, generator=gen), torch.randn(4, 5, 3, generator=gen)
    groups = torch.tensor([0, 1, 1, 2])
    for single in (None, 1):
        a, b = torch.zeros(3, 18), torch.zeros(3, 18)
        gradients_mod.add_per_example_products(a, g, x, groups, single, fast=False)
        gradients_mod.add_per_example_products(b, g, x, groups, single, fast=True)
        torch.testing.assert_close(b, a, rtol=3e-2, atol=3e-2)
        want = torch.zeros(3, 18)
        for i in range(4):
            want[single if single is not None else groups[i]] += (g[i].T @ x[i]).reshape(-1)
        torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-5)


def test_tensor_core_matmuls_only_on_cuda_and_restored():
    before = torch.get_float32_matmul_precision()
    with gradients_mod._tensor_core_matmuls(torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before
    with gradients_mod._tensor_core_matmuls(torch.device("cuda")):
        assert torch.get_float32_matmul_precision() == "high"  # TF32 allowed for fp32 products
    assert torch.get_float32_matmul_precision() == before
    assert not gradients_mod._use_fast_products(torch.device("cpu"))
