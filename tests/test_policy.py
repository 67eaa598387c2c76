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


def test_all_equal_rewards_carry_no_signal_only_where_the_estimator_is_zero():
    for variant in ("vanilla", "topk"):
        for baseline in ("mean", "loo"):
            w = policy_weights([1.0, 1.0, 1.0], variant=variant, baseline=baseline)
            assert not w.signal and w.completion == [0.0, 0.0, 0.0] and "no signal" in w.note
        # without a baseline equal rewards still push every completion up (the reference uses them)
        w = policy_weights([1.0, 1.0, 1.0], variant=variant, baseline="none", divide_by_kept=False)
        assert w.signal and w.completion == [1.0, 1.0, 1.0] if variant == "vanilla" else w.signal
        zero = policy_weights([0.0, 0.0, 0.0], variant=variant, baseline="none")
        assert not zero.signal and zero.completion == [0.0, 0.0, 0.0]
    assert not policy_weights([], baseline="mean").signal


def test_topk_keeps_the_best():
    w = policy_weights([0.1, 0.9, 0.5, 0.7], variant="topk", topk=2, baseline="none", divide_by_kept=False)
    assert w.completion == [0.0, 0.9, 0.0, 0.7]


def test_rejection_against_reference_and_fallback():
    w = policy_weights([0.2, 0.8, 0.9], variant="rejection", reference_reward=0.5, baseline="none", divide_by_kept=False)
    assert w.completion == [0.0, 0.8, 0.9] and w.reference == 0.0
    fb = policy_weights([0.2, 0.3], variant="rejection", reference_reward=0.7)
    assert fb.signal and fb.reference == 0.7 and fb.completion == [0.0, 0.0]  # weighted by its reward
    assert not policy_weights([-1.0], variant="rejection", reference_reward=0.0).signal
    none = policy_weights([0.2, 0.3], variant="rejection", reference_reward=1.0, fallback_to_reference=False)
    assert not none.signal
    with pytest.raises(ValueError, match="reference answer's reward"):
        policy_weights([0.2], variant="rejection")


def test_bad_names():
    with pytest.raises(ValueError, match="variant"):
        policy_weights([1.0], variant="ppo")
    with pytest.raises(ValueError, match="baseline"):
        policy_weights([1.0], baseline="median")


def test_rejection_keeps_completions_that_tie_the_reference():
    # exact match scores the reference 1: a correct completion ties it and must be kept (as the reference
    # implementation does), not replaced by the reference answer
    w = policy_weights([1.0, 0.0, 1.0, 0.0], variant="rejection", reference_reward=1.0, baseline="none",
                       divide_by_kept=False)
    assert w.completion == [1.0, 0.0, 1.0, 0.0] and w.reference == 0.0 and w.signal
    near = policy_weights([1.0 - 1e-7, 0.0], variant="rejection", reference_reward=1.0, baseline="none",
                          divide_by_kept=False)
    assert near.completion == [1.0 - 1e-7, 0.0]


def test_applicable_settings_name_only_what_the_variant_uses():
    from nice_kit.config import PolicySettings
    from nice_kit.policy import applicable_settings

    assert "topk" not in applicable_settings(PolicySettings(variant="vanilla"))
    assert applicable_settings(PolicySettings(variant="topk", topk=3))["topk"] == 3
    assert "fallback_to_reference" in applicable_settings(PolicySettings(variant="rejection"))
    assert "fallback_to_reference" not in applicable_settings(PolicySettings(variant="vanilla"))
