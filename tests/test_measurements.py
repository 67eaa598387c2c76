"""The measurement seam: LESS and NICE are two measurements; a third comes from outside the package."""

import pandas as pd
import pytest
import torch

from conftest import tiny_config
from nice_kit.models import tiny_model
from nice_kit.pipeline import Pipeline


def make(tokenizer, data, run_dir, **over):
    return Pipeline(tiny_config(data, **over), run_dir, model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)


# ---- a user's own measurement, written against the public API only (no nice_kit file touched) ----
from nice_kit.data import tokenize_pair  # noqa: E402
from nice_kit.gradients import mean_nll_sequence  # noqa: E402
from nice_kit.measurements import Measured, Measurement  # noqa: E402


class BareAnswerLoss(Measurement):
    """LESS on a second reference: the NLL of the answer said in a sentence instead of the response."""

    name = "bare_answer"

    def measure(self, run, ckpt, records):
        seqs = [mean_nll_sequence(tokenize_pair(run.tokenizer, r.messages, f"The answer is {r.columns['answer']}.",
                                                run.cfg.data.max_length), group=i)
                for i, r in enumerate(records)]
        return Measured(seqs)
# ---- (13 lines) ----------------------------------------------------------------------------------


def test_a_third_measurement_scores_a_run(tokenizer, small_data, tmp_path):
    p = make(tokenizer, small_data, tmp_path / "r")
    m = BareAnswerLoss()
    p.run(["less", m])
    scores = pd.read_csv(tmp_path / "r" / "scores.csv", dtype={"id": str})
    assert list(scores.columns) == ["id", "less", "bare_answer"] and scores["bare_answer"].notna().all()
    assert not scores["bare_answer"].equals(scores["less"])
    assert (tmp_path / "r" / "selected_bare_answer.jsonl").exists()
    # a fresh pipeline reads those scores back only when told which measurement made them
    q = make(tokenizer, small_data, tmp_path / "r")
    with pytest.raises(ValueError, match="bare_answer"):
        q.read_scores()
    pd.testing.assert_frame_equal(q.read_scores(measurements=[BareAnswerLoss()]), scores)


def test_a_measurement_receives_the_narrow_context_not_the_pipeline(tokenizer, small_data, tmp_path):
    from nice_kit.measurements import MeasureContext

    seen = []

    class Spy(BareAnswerLoss):
        name = "spy"

        def measure(self, run, ckpt, records):
            seen.append(run)
            return super().measure(run, ckpt, records)

    p = make(tokenizer, small_data, tmp_path / "r")
    p.warmup()
    p.validation_gradients(Spy())
    assert seen and all(isinstance(run, MeasureContext) for run in seen)
    ctx = seen[0]
    assert ctx.cfg is p.cfg and ctx.tokenizer is p.tokenizer
    for verb in ("train_gradients", "scores", "select", "run_dir", "model"):  # the pipeline stays out of reach
        assert not hasattr(ctx, verb), verb
    with pytest.raises(AttributeError):
        ctx.extra = 1  # nothing to hang state on either (__slots__)


def test_builtin_measurements_are_the_two_methods():
    from nice_kit.measurements import PolicyGradient, ReferenceLoss, as_measurement

    assert isinstance(as_measurement("less"), ReferenceLoss) and isinstance(as_measurement("nice"), PolicyGradient)
    with pytest.raises(ValueError, match="method must be one of"):
        as_measurement("ppo")


def test_pipeline_never_tests_a_method_name():
    import inspect

    import nice_kit.pipeline as pipeline_mod
    import nice_kit.stages as stages_mod

    src = inspect.getsource(pipeline_mod.Pipeline) + inspect.getsource(stages_mod)
    for pattern in ('== "less"', '== "nice"', "== 'less'", "== 'nice'", 'method == "', "m == \""):
        assert pattern not in src.replace('(m == "less" and self.cfg.data.label_free)', ""), pattern


def test_eos_counts_only_where_the_model_sampled_it(tokenizer, small_data, tmp_path, monkeypatch):
    from nice_kit.data import prompt_ids
    from nice_kit.measurements import PolicyGradient

    p = make(tokenizer, small_data, tmp_path / "r", policy={"baseline": "none"})
    p.warmup()
    ckpt = p.checkpoints[0]
    rec = p.target_val[0]
    eos = tokenizer.eos_token_id
    rows = pd.DataFrame({"prompt_id": [rec.id, rec.id], "sample": [0, 1], "completion": ["a", "b"],
                         "token_ids": [[101, 102], [103, 104, 105]], "ended_with_eos": [True, False],
                         "reward": [1.0, 0.5]})
    monkeypatch.setattr(p, "rollouts", lambda c=None: rows.copy())
    m = PolicyGradient()
    m.prepare(p, ckpt)
    seqs = m.measure(p, ckpt, [rec]).sequences
    n = len(prompt_ids(tokenizer, rec.messages))
    assert [s.input_ids[n:] for s in seqs] == [[101, 102, eos], [103, 104, 105]]  # no EOS after a cut completion
    assert [s.weights[n:] for s in seqs] == [[1.0 / 2] * 3, [0.5 / 2] * 3]  # divided by the 2 kept
    assert all(w == 0 for s in seqs for w in s.weights[:n])


def test_a_pool_copy_of_a_target_example_ranks_first_under_less(tokenizer, small_data, tmp_path):
    """Sign check at the pipeline level: training on a target prompt's own reference answer is what
    lowers its loss most, so LESS must rank that example first."""
    from nice_kit.data import load_records, save_records

    pool = load_records(small_data["pool"])
    target = load_records(small_data["target_val"])[:1]
    copy = target[0]
    copy.id = "copy-of-target"
    save_records(pool + [copy], tmp_path / "pool.jsonl")
    save_records(target, tmp_path / "val.jsonl")
    data = {**small_data, "pool": str(tmp_path / "pool.jsonl"), "target_val": str(tmp_path / "val.jsonl")}
    p = make(tokenizer, data, tmp_path / "r", selection={"methods": ["less"]})
    p.run()
    scores = p.read_scores().sort_values("less", ascending=False)
    assert scores["id"].iloc[0] == "copy-of-target", scores.head()
    assert scores["less"].iloc[0] > 0
    train, _, ids = p.load_vectors("train")
    assert torch.isfinite(train[0]).all()
