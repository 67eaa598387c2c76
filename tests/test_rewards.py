import pytest

from nice_kit.metrics import get_metric, last_number, list_metrics, metric_info, register_metric, score, strict_answer


def test_registry_lists_builtins_with_descriptions():
    df = list_metrics()
    for name in ("task_score", "exact_match", "sentiment", "length", "format"):
        row = df[df["name"] == name].iloc[0]
        assert len(row["description"]) > 20
    assert metric_info("task_score").needs_reference and not metric_info("sentiment").needs_reference
    assert metric_info("length").params == {"max_words": 5}


def test_unknown_metric_and_parameter_errors():
    with pytest.raises(KeyError, match="unknown metric 'nope'"):
        get_metric("nope")
    with pytest.raises(TypeError, match="takes parameters"):
        get_metric("length", max_chars=3)


def test_task_score_strict_versus_lenient():
    cols = {"task": ["products"] * 3, "answer": ["56"] * 3}
    completions = ["56", "Let me think.\n7 times 8 is 56.", "58"]
    assert get_metric("task_score")(["q"] * 3, completions, **cols) == [1.0, 0.0, 0.0]
    assert get_metric("task_score", extract="last_number")(["q"] * 3, completions, **cols) == [1.0, 1.0, 0.0]


def test_task_score_needs_its_columns():
    with pytest.raises(KeyError, match="needs the target column 'answer'"):
        get_metric("task_score")(["q"], ["1"], task=["products"])


def test_exact_match_and_extractors():
    m = get_metric("exact_match")
    assert m(["q", "q"], [" 12 \nmore", "13"], answer=["12", "12"]) == [1.0, 0.0]
    assert strict_answer("  7\n8") == "7" and last_number("a 1,000 b -3.5 c") == "-3.5" and last_number("none") == ""


def test_label_free_metrics():
    s = get_metric("sentiment")(["q", "q"], ["I love this, wonderful!", "This is terrible and awful."])
    assert s[0] > 0.75 and s[1] < 0.25
    assert get_metric("length", max_words=2)(["q"] * 3, ["a b", "a b c", "a b c d e f"]) == [1.0, 0.5, 0.0]
    assert get_metric("format")(["q"] * 3, ["42", " -7 ", "42 apples"]) == [1.0, 1.0, 0.0]


def test_user_function_and_registration():
    def shout(prompts, completions, **columns):
        return [float(c.isupper()) for c in completions]

    assert get_metric(shout) is shout
    register_metric("test_shout", "1 if the completion is upper case.")(lambda: shout)
    assert get_metric("test_shout")(["q", "q"], ["YES", "no"]) == [1.0, 0.0]


def test_score_checks_what_a_metric_returns():
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        score(lambda p, c, **k: [1.0], ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="non-finite"):
        score(lambda p, c, **k: [float("nan")], ["a"], ["x"])
    assert score(lambda p, c, **k: [1, 0], ["a", "b"], ["x", "y"]) == [1.0, 0.0]


def test_metrics_check_their_parameters_and_records_without_being_built():
    info = metric_info("task_score")
    assert info.param_problems({"extract": "fuzzy"}) == ["extract must be one of ['last_number', 'strict'], not 'fuzzy'"]
    assert info.param_problems({"bogus": 1})[0].startswith("metric 'task_score' has no parameter 'bogus'")
    assert info.param_problems({}) == [] and info.record_problems({}, {"task": "products", "answer": "1"}) == []
    assert info.record_problems({}, {"task": "prodcts", "answer": "1"}) == [
        "task 'prodcts' has no reasoning-gym scorer; did you mean 'products'?"]
    assert metric_info("format").param_problems({"pattern": "("})[0].startswith("pattern '(' is not a valid")
    assert metric_info("length").param_problems({"max_words": 0}) == [
        "max_words must be an integer of at least 1, not 0"]


def test_a_registered_metric_can_bring_its_own_checks():
    built = []

    def factory(threshold: float = 0.5):
        built.append(threshold)
        return lambda prompts, completions, **columns: [float(len(c) > threshold) for c in completions]

    register_metric("test_checked", "Length above a threshold.", columns=("label",),
                    check_params=lambda p: [] if p["threshold"] >= 0 else ["threshold must be >= 0"],
                    check_record=lambda p, cols: [] if cols.get("label") in ("a", "b") else ["label must be a or b"])(
        factory)
    info = metric_info("test_checked")
    assert info.param_problems({"threshold": -1}) == ["threshold must be >= 0"]
    assert info.record_problems({}, {"label": "c"}) == ["label must be a or b"]
    assert info.needed_columns({}) == ("label",) and built == []  # nothing was built to check


def test_old_module_name_still_works_and_says_it_moved():
    import importlib
    import sys

    import nice_kit.metrics as metrics

    sys.modules.pop("nice_kit.rewards", None)
    with pytest.warns(DeprecationWarning, match="moved to nice_kit.metrics"):
        old = importlib.import_module("nice_kit.rewards")
    assert old.get_metric is metrics.get_metric and old.score is metrics.score
