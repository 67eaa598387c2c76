import numpy as np
import pytest
import torch

from nice_kit.influence import influence_scores, top_fraction
from nice_kit.warmup import Checkpoint, checkpoint_weights


def test_scores_are_checkpoint_weighted_cosines_aggregated_by_subtask():
    train = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    val = [torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])] * 2
    w = [0.75, 0.25]
    sims = 0.75 * (train[0] @ val[0].T) + 0.25 * (train[1] @ val[1].T)
    s = influence_scores(train, val, w, ["a", "a", "b"])
    expect = torch.stack([sims[:, :2].mean(1), sims[:, 2]], 1).max(1).values
    np.testing.assert_allclose(s, expect.numpy(), rtol=1e-6)
    np.testing.assert_allclose(influence_scores(train, val, w, ["a", "a", "b"], aggregate="mean"),
                               sims.mean(1).numpy(), rtol=1e-6)


def test_prompts_without_signal_are_left_out():
    train = [torch.tensor([[1.0, 0.0]])]
    val = [torch.tensor([[1.0, 0.0], [0.0, 0.0]])]  # second prompt: zero gradient (no signal)
    s = influence_scores(train, val, [1.0], ["a", "a"], valid=torch.tensor([1.0, 0.0]))
    assert s[0] == pytest.approx(1.0)
    s = influence_scores(train, val, [1.0], ["a", "b"], valid=torch.tensor([True, False]))  # subtask b empty
    assert s[0] == pytest.approx(1.0) and not np.isnan(s).any()
    with pytest.raises(ValueError, match="no target prompt carries a signal"):
        influence_scores(train, val, [1.0], ["a", "a"], valid=torch.tensor([0.0, 0.0]))


def test_checkpoint_weights():
    ck = [Checkpoint(1, None, 3e-4), Checkpoint(2, None, 1e-4)]
    assert checkpoint_weights(ck) == pytest.approx([0.75, 0.25])
    assert checkpoint_weights([Checkpoint(1, None, 0.0)] * 2) == [0.5, 0.5]


def test_top_fraction_is_deterministic():
    ids = ["a", "b", "c", "d", "e"]
    assert top_fraction(ids, np.array([0.1, 0.5, 0.5, -1.0, 0.2]), 0.4) == ["b", "c"]
    assert top_fraction(ids, np.zeros(5), 0.01) == ["a"]
    with pytest.raises(ValueError, match="NaN"):
        top_fraction(ids, np.array([0.1, np.nan, 0, 0, 0]), 0.4)
    with pytest.raises(ValueError, match="fraction"):
        top_fraction(ids, np.zeros(5), 0.0)


def test_random_subset_is_seeded_and_sized_like_the_selection():
    from nice_kit.influence import random_subset

    ids = [f"x{i}" for i in range(50)]
    a = random_subset(ids, 0.1, seed=0)
    assert len(a) == 5 and a == sorted(a) and set(a) <= set(ids)
    assert random_subset(ids, 0.1, seed=0) == a and random_subset(ids, 0.1, seed=1) != a


def test_top_k_equals_a_full_sort_with_ties_broken_by_position():
    from nice_kit.influence import top_k_indices

    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(1, 200))
        scores = rng.integers(0, 6, size=n).astype(np.float32)  # many ties
        for k in (1, n // 3, n):
            full = np.lexsort((np.arange(n), -scores))[:k]
            assert top_k_indices(scores, k).tolist() == full.tolist()


def test_scores_stream_in_blocks_equal_the_whole_matrix():
    g = torch.Generator().manual_seed(0)
    train = [torch.nn.functional.normalize(torch.randn(101, 16, generator=g), dim=1) for _ in range(2)]
    val = [torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1) for _ in range(2)]
    subtasks = ["a", "a", "b", "b", "b", "c"]
    whole = influence_scores(train, val, [0.6, 0.4], subtasks)
    blocks = influence_scores(train, val, [0.6, 0.4], subtasks, block_rows=7)
    np.testing.assert_allclose(blocks, whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("aggregate", ["max_of_means", "mean"])
def test_scoring_against_subtask_means_gives_the_per_prompt_scores(aggregate):
    """The what-if's speed option: by linearity, scoring against one averaged vector per subtask gives
    the per-prompt aggregate (masked prompts and an empty subtask included), to float rounding."""
    g = torch.Generator().manual_seed(3)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    train, val = [unit(300, 64) for _ in range(3)], [unit(40, 64) for _ in range(3)]
    subtasks = [f"t{i % 4}" for i in range(40)]
    valid = torch.tensor([i % 3 != 0 and subtasks[i] != "t2" for i in range(40)])  # t2 has no valid prompt
    w = [0.5, 0.3, 0.2]
    per_prompt = influence_scores(train, val, w, subtasks, valid, aggregate, block_rows=128)
    by_means = influence_scores(train, val, w, subtasks, valid, aggregate, block_rows=128, by_subtask_means=True)
    np.testing.assert_allclose(by_means, per_prompt, rtol=0, atol=2e-6)
    assert np.abs(per_prompt).max() > 0.05  # not a comparison of zeros
    exact = influence_scores([t.double() for t in train], [v.double() for v in val], w, subtasks, valid, aggregate,
                             by_subtask_means=True)
    np.testing.assert_allclose(exact, influence_scores([t.double() for t in train], [v.double() for v in val], w,
                                                       subtasks, valid, aggregate), rtol=0, atol=1e-12)
