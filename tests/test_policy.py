import pytest

from nice_kit.policy import policy_weights


def test_vanilla_is_reward_weighted_divided_by_kept():
    w = policy_weights([1.0, 0.0, 1.0, 0.0], variant="vanilla", baseline="none")
    assert w.completion == [0.25, 0.0, 0.25, 0.0] and w.signal


def test_mean_and_leave_one_out_baselines():
    r = [1.0, 0.0, 0.0, 0.0]
    assert policy_weights(r, baseline="mean", divide_by_kept=False).completion == pytest.approx([0.75, -0.25, -0.25, -0.25])
    loo = policy_weights(r, baseline="loo", divide_by_kept=False).completion
    assert loo == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    assert sum(policy_weights(r, baseline="mean").completion) == pytest.approx(0.0)


def test_all_equal_rewards_carry_no_signal():
    for variant in ("vanilla", "topk"):
        for baseline in ("none", "mean", "loo"):
            w = policy_weights([1.0, 1.0, 1.0], variant=variant, baseline=baseline)
            assert not w.signal and w.completion == [0.0, 0.0, 0.0] and "no signal" in w.note
    assert not policy_weights([], baseline="mean").signal


def test_topk_keeps_the_best():
    w = policy_weights([0.1, 0.9, 0.5, 0.7], variant="topk", topk=2, baseline="none", divide_by_kept=False)
    assert w.completion == [0.0, 0.9, 0.0, 0.7]


def test_rejection_against_reference_and_fallback():
    w = policy_weights([0.2, 0.8, 0.9], variant="rejection", reference_reward=0.5, baseline="none", divide_by_kept=False)
    assert w.completion == [0.0, 0.8, 0.9] and w.reference == 0.0
    fb = policy_weights([0.2, 0.3], variant="rejection", reference_reward=1.0)
    assert fb.signal and fb.reference == 1.0 and fb.completion == [0.0, 0.0]
    none = policy_weights([0.2, 0.3], variant="rejection", reference_reward=1.0, fallback_to_reference=False)
    assert not none.signal
    with pytest.raises(ValueError, match="reference answer's reward"):
        policy_weights([0.2], variant="rejection")


def test_bad_names():
    with pytest.raises(ValueError, match="variant"):
        policy_weights([1.0], variant="ppo")
    with pytest.raises(ValueError, match="baseline"):
        policy_weights([1.0], baseline="median")
