"""policy.estimator = "reference" is the reference implementation's arithmetic: checked against an
independent float64 oracle (tests/reference_oracle.py) on a tiny model, for every reference variant."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import reference_check as rc
import reference_oracle as oracle
from conftest import tiny_config
from nice_kit.config import ConfigError, RunConfig
from nice_kit.demo import fast_data
from nice_kit.models import tiny_model
from nice_kit.pipeline import Pipeline
from nice_kit.policy import REFERENCE_VARIANTS, applicable_settings, reference_weights

REFERENCE_POLICY = {"estimator": "reference", "variant": "vanilla", "baseline": "none"}


@pytest.fixture(scope="module")
def case(tokenizer, tmp_path_factory):
    """A tiny run (8 pool examples, 8 target prompts in two subtasks, 2 checkpoints, 12 real samples
    per prompt) with designed rewards; the oracle's float64 models per checkpoint."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reference")
    data = fast_data(root / "data", n_pool=8, n_val=4, n_test=2)
    cfg = tiny_config(data, rollouts={"k": 12, "max_new_tokens": 5}, policy=REFERENCE_POLICY,
                      projection={"dim": 2048})
    cfg.data.max_length = 512  # no truncation: the oracle never truncates
    run = Pipeline(cfg, root / "run", model=tiny_model(tokenizer, seed=3), tokenizer=tokenizer, verbose=False)
    run.warmup()
    tables, refs = rc.designed_rollouts({c.epoch: run.rollouts(c) for c in run.checkpoints}, tokenizer)
    rc.feed(run, tables, refs)
    model64 = copy.deepcopy(run.model).double()  # nice_kit's engine sums in float64 for a float64 model
    train = rc.nice_kit_train(run, model64)
    return run, tables, refs, train, rc.Oracle(run, tables, refs), model64


def test_the_designed_rollouts_exercise_every_particular_case(case):
    run, tables, *_ = case
    got = rc.exercised(run, tables)
    assert all(got.values()), got
    assert len(set(run.target_subtasks())) == 2 and len(run.checkpoints) == 2


@pytest.mark.parametrize("variant,worst_case_protect,do_normalize", rc.CASES)
def test_reference_estimator_equals_the_oracle(case, variant, worst_case_protect, do_normalize):
    run, tables, refs, train, orc, model64 = case
    rc.with_policy(run, variant, worst_case_protect, do_normalize)
    ours, ref = rc.nice_kit_side(run, train, model64), orc.side(variant, worst_case_protect, do_normalize)
    got = rc.agreement(ours, ref)
    assert got["zeros_agree"], got
    assert got["min_cosine"] >= 0.999999, got
    assert got["scores_rel_err"] <= 1e-6, got
    assert got["same_ranking"], got
    # the reference counts a zero prompt gradient in its subtask's mean: nice_kit marks every prompt valid
    assert all(v is not None and all(v) for v in ours.valid)


def test_the_oracle_differs_from_nice_kits_own_estimator(case):
    """The oracle is sharp: nice_kit's own estimator (sampled ids with EOS, no-signal prompts left
    out, mean baseline) does not pass for it."""
    run, tables, refs, train, orc, model64 = case
    from dataclasses import replace

    run.cfg.policy = replace(run.cfg.policy, estimator="nice_kit", variant="vanilla", baseline="none")
    ours = rc.nice_kit_side(run, train, model64)
    got = rc.agreement(ours, orc.side("vanilla", False, False))
    assert got["min_cosine"] < 0.999 or not got["zeros_agree"] or got["scores_rel_err"] > 1e-3, got


def test_pipeline_scores_with_the_reference_estimator_match_the_projected_oracle(case, tmp_path):
    """End to end through the stages: the stored NICE vectors and scores.csv equal the oracle's
    gradients put through the run's own projection, within float16 storage."""
    run, tables, refs, train, orc, _ = case
    rc.with_policy(run, "topk_hard", True, False)
    run.train_gradients()
    run.validation_gradients("nice")
    got = run.scores(["nice"])["nice"].to_numpy()
    ref = orc.side("topk_hard", True, False)
    project = lambda x: run.projector.project(x.float()).double()  # noqa: E731
    expected = oracle.scores([project(t) for t in ref.train], [project(v) for v in ref.val],
                             [c.lr for c in run.checkpoints], run.target_subtasks())
    stored = run.stored_vectors("nice")
    for c, s in enumerate(stored):
        rows = s.all().double()
        for j, g in enumerate(project(ref.val[c])):
            if g.norm() == 0:
                assert rows[j].norm() == 0
            else:
                assert rc.cosine(rows[j], g) >= 0.9999
    assert np.abs(got - expected).max() <= 3e-3 * max(1.0, np.abs(expected).max())


def test_reference_weights_by_hand():
    r = [1.0, 0.0, 0.5, -1.0]
    assert reference_weights(r, variant="vanilla").completion == r
    assert reference_weights(r, variant="rejection").completion == [0.5, 0.0, 0.25, 0.0]  # keep r > 0, / 2
    # hard: keep r > r_ref - 1e-5 (a tie with the reference is kept), / number kept
    assert reference_weights(r, variant="hard_rejection", reference_reward=0.5).completion == [0.5, 0.0, 0.25, 0.0]
    assert reference_weights(r, variant="hard_rejection", reference_reward=-1.0).completion == [0.25, 0.0, 0.125, -0.25]
    # top 10 of 12 tied rewards: the two earliest samples are the ones left out
    ties = [1.0] * 12
    w = reference_weights(ties, variant="topk_rejection").completion
    assert w[:2] == [0.0, 0.0] and w[2:] == [0.1] * 10
    # nothing kept: zero, or the reference answer times its reward with worst_case_protect
    none = reference_weights([0.0, -1.0], variant="rejection", reference_reward=0.7)
    assert none.completion == [0.0, 0.0] and none.reference == 0.0 and not none.signal
    protect = reference_weights([0.0, -1.0], variant="rejection", reference_reward=0.7, worst_case_protect=True)
    assert protect.reference == 0.7 and protect.signal
    with pytest.raises(ValueError, match="reference answer's reward"):
        reference_weights(r, variant="topk_hard")
    with pytest.raises(ValueError, match="variant must be one of"):
        reference_weights(r, variant="topk")


def test_reference_settings_are_checked(small_data):
    base = {"data": small_data, "policy": REFERENCE_POLICY}
    RunConfig.from_dict(base)
    for variant in REFERENCE_VARIANTS:
        RunConfig.from_dict({**base, "policy": {**REFERENCE_POLICY, "variant": variant}})
    with pytest.raises(ConfigError, match="subtracts no baseline"):
        RunConfig.from_dict({**base, "policy": {"estimator": "reference", "variant": "vanilla"}})
    with pytest.raises(ConfigError, match="reference estimator's variants"):
        RunConfig.from_dict({**base, "policy": {**REFERENCE_POLICY, "variant": "topk"}})
    with pytest.raises(ConfigError, match="set estimator"):
        RunConfig.from_dict({"data": small_data, "policy": {"variant": "topk_hard"}})
    with pytest.raises(ConfigError, match="do_normalize"):
        RunConfig.from_dict({**base, "policy": {**REFERENCE_POLICY, "token_normalize": True}})
    with pytest.raises(ConfigError, match="label-free run has none"):
        RunConfig.from_dict({"data": {**small_data, "label_free": True}, "metric": {"name": "length"},
                             "selection": {"methods": ["nice"]},
                             "policy": {**REFERENCE_POLICY, "variant": "hard_rejection"}})
    with pytest.raises(ConfigError, match="estimator"):
        RunConfig.from_dict({**base, "policy": {**REFERENCE_POLICY, "estimator": "paper"}})


def test_stage_keys_of_nice_kits_estimator_are_unchanged():
    """Adding the reference estimator changes no key of runs made with nice_kit's own."""
    from nice_kit.config import PolicySettings

    assert applicable_settings(PolicySettings()) == {"variant": "vanilla", "baseline": "mean", "divide_by_kept": True,
                                                     "token_normalize": False, "include_eos": True}
    ref = applicable_settings(PolicySettings(estimator="reference", variant="topk_hard", baseline="none"))
    assert ref == {"estimator": "reference", "variant": "topk_hard", "do_normalize": False, "worst_case_protect": False}


def test_paper_config_uses_the_reference_estimator():
    from pathlib import Path

    cfg = RunConfig.from_file(Path(__file__).resolve().parent.parent / "configs" / "paper.toml", check_model=False)
    assert cfg.policy.estimator == "reference" and cfg.policy.variant in REFERENCE_VARIANTS
    assert cfg.policy.baseline == "none" and not cfg.policy.worst_case_protect and not cfg.policy.do_normalize
    assert (cfg.rollouts.k, cfg.rollouts.temperature, cfg.rollouts.top_k, cfg.rollouts.top_p) == (20, 1.2, 50, 0.95)
    assert cfg.selection.aggregate == "max_of_means"


def test_the_rollout_viewer_describes_the_reference_estimator():
    import widgets
    from nice_kit.config import PolicySettings

    ref = PolicySettings(estimator="reference", variant="topk_hard", baseline="none", worst_case_protect=True)
    assert widgets.policy_summary(ref) == "reference estimator: topk_hard, do_normalize=False, worst_case_protect=True"
    text = widgets.weight_explanation(ref, 20)
    assert "10 best" in text and "reference answer's" in text and "worst_case_protect" in text
    vanilla = widgets.weight_explanation(PolicySettings(estimator="reference", baseline="none"), 20)
    assert "no division" in vanilla and "baseline=" not in widgets.policy_summary(
        PolicySettings(estimator="reference", baseline="none"))


def test_explain_adds_up_under_the_reference_estimator(tokenizer, small_data, tmp_path):
    """explain's parts (re-encoded completions, zero prompts counted) add up to the stored scores."""
    from nice_kit.explain import check_decomposition

    torch.set_num_threads(1)
    cfg = tiny_config(small_data, policy={**REFERENCE_POLICY, "variant": "rejection", "worst_case_protect": True},
                      selection={"methods": ["nice"]})
    p = Pipeline(cfg, tmp_path / "run", model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)
    p.run(["nice"])
    df = check_decomposition(p, "nice")
    assert df["difference"].abs().max() <= 1e-5
    assert (df["completion_ratio"] <= 1).all()


def test_bundled_model_agrees_with_the_oracle_for_every_reference_variant():
    """bench/bench_reference.py --quick on SmolLM2-135M: Spearman >= 0.99, identical top 1-3 and prompt
    cosines >= 0.999999 for the five reference variants (exit 0), the oracle's model in float32."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "bench" / "bench_reference.py"), "--quick", "--oracle-dtype",
                          "float32", "--threads", "1"], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "5 of 5 reference cases agree" in out.stdout
