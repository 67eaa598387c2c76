"""The widgets around what-ifs (issue 18, items 5-7): the metric picker's "what would NICE select
with this?" and its adopt button, the explorer's what-if column and export, the side-by-side
NICE-vs-LESS why, prompt texts that tell examples apart, and figures that follow the theme.

Works on copies of the session's fast-mode run (``fast_run``, read-only), with the what-if parts."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
from conftest import copy_run

import widgets
from nice_kit.explain import explain
from nice_kit.export import selection_records, to_jsonl
from nice_kit.influence import top_fraction
from nice_kit.whatif import completion_parts, what_if
from widgets import InfluenceExplorer, MetricPicker, WhyPanel, _theme, open_run
from widgets._run import (adopt_what_if, distinguishing_text, harmful_share, model_problem, response_correct,
                          target_labels)
from widgets.metric_picker import POLICY_PRESETS


@pytest.fixture(scope="module")
def run(fast_run, tmp_path_factory):
    """This module's copy of the fast run (it shares the tiny model), with the what-if parts stored."""
    p = copy_run(fast_run, tmp_path_factory.mktemp("widgets_whatif") / "run")
    completion_parts(p)
    return p


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&#x27;", "'").replace("&quot;", '"')


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------- what tells them apart
def test_distinguishing_text_keeps_the_operands_and_drops_the_boilerplate():
    texts = ["Solve the following multiplication: 8 * 7. Give only the result as your final answer.",
             "Solve the following multiplication: 8 * 3. Give only the result as your final answer.",
             "Calculate -57 - 72. Give only the result as your final answer.",
             "Calculate ( 3 + 4 ). Give only the result as your final answer.",
             "Spell this word backward (example: sun -> nus): recoin"]
    got = distinguishing_text(texts, ["products", "products", "basic", "basic", "spell"])
    assert got == ["8 * 7", "8 * 3", "-57 - 72", "( 3 + 4 )", texts[4]]  # alone in its group: whole
    assert distinguishing_text(["same text", "same text"]) == ["same text", "same text"]  # nothing left: whole


def test_response_correct_compares_text_and_numbers():
    assert response_correct(" 56 ", "56") and response_correct("56.0", "56") and response_correct("Nus", "nus")
    assert response_correct("58", "56") is False
    assert response_correct("58", None) is None


def test_explorer_prompt_column_and_correctness(run):
    e = InfluenceExplorer(run, theme="light")
    by_id = {r.id: r for r in run.pool}
    for r in e.frame.itertuples():
        rec = by_id[r.id]
        assert r.prompt_core in rec.prompt and len(r.prompt_core) <= len(rec.prompt)
        assert r.correct == response_correct(rec.response, rec.columns.get("answer"))
    products = e.frame[e.frame["task"] == "products"]
    assert products["prompt_core"].str.fullmatch(r"-?\d+ \* -?\d+").all(), products["prompt_core"].tolist()
    assert set(e.frame["correct"]) == {True, False}  # the slice has wrong answers and right ones
    html = e.table_html()
    row = e.shown.iloc[0]
    assert f">{_theme_safe(row['prompt_core'])}</div>" in html  # the cell shows the distinguishing part
    assert ("✓ right" in html) or ("✗ wrong" in html)
    assert row["prompt_core"][:20] in e.select.options[0][0]  # the example dropdown's label too


def _theme_safe(text: str) -> str:
    from widgets import _html as H

    return H.esc(H.short(text, 220))


# ------------------------------------------------------------------------------ the metric picker
def test_picker_what_if_shows_both_selections_side_by_side(run):
    explorer = InfluenceExplorer(run, theme="light")
    picker = MetricPicker(run, theme="light", explorer=explorer)
    picker.dropdown.value = "sentiment"
    assert picker.what_if_changes() == {"metric.name": "sentiment", "metric.params": {}}
    wi = picker.what_if()
    expected = what_if(run, {"metric.name": "sentiment", "metric.params": {}}, compute=False)
    assert wi.selected == expected.selected and wi.current == expected.current
    np.testing.assert_allclose(wi.scores["what_if"], expected.scores["what_if"], rtol=1e-6, atol=1e-9)
    text = _text(picker.whatif_html.value)
    k = len(wi.selected)
    assert f"shares {wi.overlap} of {k} with the run's selection" in text
    flags = {r.id: bool(r.columns.get("harmful")) for r in run.pool}
    now = sum(flags[i] for i in wi.current) / k
    then = sum(flags[i] for i in wi.selected) / k
    assert f"{now:.0%} of the run's selection, {then:.0%} of the what-if's" in text
    assert harmful_share(run, wi.selected) == pytest.approx(then)
    side = re.search(r"<table class='nice-kit-table nice-whatif-side'>.*?</table>", picker.whatif_html.value).group(0)
    rows = re.findall(r"<tr><td class='nice-kit-num'>(\d+)</td><td>(.*?)</td><td>(.*?)</td></tr>", side)
    assert [int(r[0]) for r in rows] == list(range(1, k + 1))
    assert [re.search(r"<b>([^<]+)</b>", r[1]).group(1) for r in rows] == wi.current
    assert [re.search(r"<b>([^<]+)</b>", r[2]).group(1) for r in rows] == wi.selected
    for cur, (_, left, _) in zip(wi.current, rows):
        assert ("dropped" in left) == (cur not in wi.selected)
    for rid in wi.moves["id"]:
        assert rid in picker.whatif_html.value.replace("<wbr>", "")  # the rank moves table
    assert "answered in" in picker.whatif_status.value and not picker.adopt_button.disabled
    # the explorer got a what-if column beside nice and less, sortable and filterable
    assert explorer.methods == ["nice", "less", "what_if"]
    col = explorer.frame.set_index("id")["what_if"]
    np.testing.assert_allclose(col.reindex(wi.scores["id"]).to_numpy(), wi.scores["what_if"].to_numpy())
    explorer.picked.value = "WHAT_IF"
    assert sorted(explorer.table["id"]) == sorted(wi.selected)
    explorer.picked.value = "NICE"
    assert sorted(explorer.table["id"]) == sorted(wi.current)  # the run's own filters are unchanged
    assert "what_if" in re.findall(r'data-sort="([^"]+)"', explorer.table_html())
    assert "nice-whatif-side" in picker.fallback_body()  # the static copy holds the answer


@pytest.mark.parametrize("preset", [p for p in POLICY_PRESETS if p != "the run's policy"])
def test_policy_presets_ask_what_the_run_would_answer(run, preset):
    picker = MetricPicker(run, theme="light")
    picker.policy.value = preset
    wi = picker.what_if()
    expected = what_if(run, POLICY_PRESETS[preset], compute=False)
    assert wi.changes == POLICY_PRESETS[preset]
    np.testing.assert_allclose(wi.scores["what_if"], expected.scores["what_if"], rtol=1e-6, atol=1e-9)


def test_changed_settings_disable_adopting_a_shown_what_if(run):
    picker = MetricPicker(run, theme="light")
    picker.policy.value = "no baseline"
    picker.what_if()
    assert not picker.adopt_button.disabled
    picker.policy.value = "leave-one-out baseline"
    assert picker.adopt_button.disabled and "settings changed" in picker.whatif_status.value


def test_missing_parts_offer_to_compute_them(run, tmp_path):
    q = copy_run(run, tmp_path / "run", leave_out=("nice_parts",))
    picker = MetricPicker(q, theme="light")
    picker.policy.value = "no baseline"
    picker._on_what_if()  # what the button does: never loads the model
    assert picker.compute_button.layout.display is None
    assert "per-completion gradients for what-ifs" in picker.whatif_status.value and picker.adopt_button.disabled
    picker._on_what_if(compute=True)  # the compute button
    assert picker.compute_button.layout.display == "none" and picker.what_if_result is not None
    assert picker.what_if_result.selected == what_if(run, {"policy.baseline": "none"}, compute=False).selected
    assert (q.run_dir / "grads" / "nice_parts" / "epoch_1").is_dir()


def test_adopt_writes_the_config_and_the_scores_through_the_checked_stages(run, tmp_path):
    q = copy_run(run, tmp_path / "run")
    picker = MetricPicker(q, theme="light")
    picker._param_widgets["max_words"].value = 2  # the run's metric is length(max_words=3)
    picker.policy.value = "no baseline"
    wi = picker.what_if()
    assert wi.changes == {"metric.name": "length", "metric.params": {"max_words": 2}, "policy.baseline": "none"}
    adopted = picker.adopt()
    cfg = json.loads((q.run_dir / "config.json").read_text())
    assert cfg["metric"]["params"] == {"max_words": 2} and cfg["policy"]["baseline"] == "none"
    reopened = open_run(q.run_dir)  # a fresh reader: every stage checked against the new config
    scores = reopened.read_scores().set_index("id")
    got = scores["nice"].reindex(wi.scores["id"]).to_numpy()
    assert np.abs(got - wi.scores["what_if"].to_numpy()).max() <= 2e-3  # float16 storage, as tests/test_whatif.py
    assert top_fraction(wi.scores["id"].tolist(), got, reopened.cfg.selection.fraction) == wi.selected
    picked = [json.loads(line)["id"] for line in (q.run_dir / "selected.jsonl").read_text().splitlines()]
    assert picked == top_fraction(scores.index.tolist(), scores["nice"].to_numpy(), reopened.cfg.selection.fraction)
    np.testing.assert_allclose(scores["less"].reindex(wi.scores["id"]).to_numpy(),
                               run.read_scores().set_index("id")["less"].reindex(wi.scores["id"]).to_numpy())
    assert adopted.cfg.policy.baseline == "none" and picker.run_metric == "length"
    assert "adopted" in picker.whatif_status.value and picker.adopt_button.disabled


def test_adopt_refuses_clearly_without_the_model_and_changes_nothing(run, tmp_path):
    q = copy_run(run, tmp_path / "run")
    files = [q.run_dir / "config.json", q.run_dir / "scores.csv", q.run_dir / "grads/val_nice/epoch_1/stage.json"]
    before = [_digest(f) for f in files]
    on_disk = open_run(q.run_dir)  # no model: the config names the default model, which does not fit a tiny run
    picker = MetricPicker(on_disk, theme="light")
    picker.policy.value = "no baseline"
    picker.what_if()
    picker._on_adopt()  # the button
    assert "not adopted" in picker.whatif_status.value and "does not fit the run's warmup adapters" in \
        _text(picker.whatif_status.value)
    assert [_digest(f) for f in files] == before
    on_disk.read_scores()  # still current
    on_disk.cfg.model = str(tmp_path / "no-such-model")  # a model that is not there at all
    assert "is not available here" in model_problem(on_disk)
    with pytest.raises(RuntimeError, match="needs the model"):
        adopt_what_if(on_disk, picker.what_if_result)
    assert [_digest(f) for f in files] == before


def test_model_metrics_are_unavailable_without_a_model(run):
    picker = MetricPicker(run, theme="light")
    labels = dict((v, t) for t, v in picker.dropdown.options)
    for name in ("reward_model", "llm_judge"):
        assert labels[name] == f"{name} — unavailable: no model configured"
    picker.dropdown.value = "reward_model"
    assert "no model configured" in picker.unavailable()
    assert "no model configured" in picker.status.value
    picker._param_widgets["model"].value = "some/reward-model"
    assert picker.unavailable() is None or "no model configured" not in picker.unavailable()
    picker.dropdown.value = "llm_judge"
    picker._param_widgets["local_model"].value = "some/judge"
    assert picker.unavailable() is None or "no model configured" not in picker.unavailable()
    longest = max(len(t) for t, _ in picker.dropdown.options)
    assert int(picker.dropdown.layout.width.removesuffix("px")) >= 7 * longest  # room for the longest label


# ---------------------------------------------------------------------------- the explorer's export
def test_explorer_exports_its_filtered_view(run, tmp_path):
    e = InfluenceExplorer(run, theme="light")
    e.picked.value = "LESS"
    path = e.export(tmp_path / "view.jsonl")
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert ids == e.table["id"].tolist() and 0 < len(ids) < len(e.frame)
    assert path.read_bytes() == to_jsonl(selection_records(run, e.table), tmp_path / "again.jsonl").read_bytes()
    assert f"wrote {len(ids)} examples" in e.export_status.value
    ds = e.to_dataset()
    assert ds["id"] == ids and ds[0]["messages"][-1]["role"] == "assistant"
    e.export_path.value = str(tmp_path)  # a folder: the button says why it failed
    e._on_export()
    assert "export failed" in e.export_status.value


# --------------------------------------------------------------------------------- the why panel
def test_side_by_side_why_adds_up_to_both_scores(run):
    rid = run.read_scores().sort_values("nice").iloc[-1]["id"]
    panel = WhyPanel(run, rid, "nice", compute=False, theme="light", top=100)
    assert panel.compare_bars is None
    table = panel.compare()
    nice, less = explain(run, rid, "nice", compute=False), explain(run, rid, "less", compute=False)
    assert table["nice"].sum() == pytest.approx(nice.score, abs=1e-5)
    assert table["less"].sum() == pytest.approx(less.score, abs=1e-5)
    assert [t.name for t in panel.compare_bars.data] == ["NICE", "LESS"]
    labels = target_labels(run)
    for trace in panel.compare_bars.data:
        assert list(trace.y) == table["label"].tolist()
        assert all(labels[pid] in lab for pid, lab in zip(trace.customdata, trace.y))  # labelled by text
    assert f"NICE {nice.score:+.4g}" in panel.compare_bars.layout.annotations[0].text
    html = panel.fallback_body()
    assert "nice-why-compare-table" in html and "LESS" in html
    other = run.read_scores().sort_values("nice").iloc[0]["id"]
    panel.show(other)  # another example redraws the comparison
    assert panel.compare_frame["nice"].sum() == pytest.approx(explain(run, other, "nice", compute=False).score,
                                                              abs=1e-5)
    panel.compare_toggle.value = False
    assert panel.compare_box.children == ()


def test_why_bars_are_labelled_by_the_prompts_text(run):
    rid = run.read_scores().iloc[0]["id"]
    panel = WhyPanel(run, rid, "nice", compute=False, theme="light")
    labels = target_labels(run)
    ys, pids = list(panel.bars.data[0].y), list(panel.bars.data[0].customdata)
    assert ys and all(labels[p] in y for p, y in zip(pids, ys))
    assert all(not y.startswith("val-") for y in ys)
    assert all(labels[pid] in label for label, pid in panel.prompt.options)


def test_computing_completions_shows_the_result_not_computing(run, tmp_path):
    q = copy_run(run, tmp_path / "run", leave_out=("val_nice_completions",))
    rid = q.read_scores().iloc[0]["id"]
    panel = WhyPanel(q, rid, "nice", compute=False, theme="light")
    assert panel.compute_button.layout.display is None  # not stored yet: the button is offered
    expl = panel.compute_completions()
    assert expl is not None and expl.completions is not None
    assert "computing" not in panel.status.value
    assert f"the gradients of {len(expl.completions)} completions" in panel.status.value
    assert panel.progress.outputs == ()  # the progress bar is gone once done
    assert panel.compute_button.layout.display == "none"


# ------------------------------------------------------------------------------------- the theme
def test_static_figures_follow_the_theme():
    saved = pio.templates.default
    try:
        assert widgets.use_theme_template("light") == "nice_kit_light"
        assert go.Figure().to_dict()["layout"]["template"]["layout"]["paper_bgcolor"] == _theme.PAPER["light"]
        _theme._tell_followers({"new": "dark"})  # what the page's probe reports on a theme switch
        assert pio.templates.default == "nice_kit_dark"
        assert go.Figure().to_dict()["layout"]["template"]["layout"]["paper_bgcolor"] == _theme.PAPER["dark"]
        pio.templates.default = "seaborn"  # a template the user chose is left alone
        assert widgets.use_theme_template("light") == "seaborn"
        _theme._tell_followers({"new": "light"})
        assert pio.templates.default == "seaborn"
    finally:
        pio.templates.default = saved


def test_run_in_raises_even_where_an_ipython_shell_swallows_output_exceptions():
    """An Output widget used as a context manager swallows exceptions when an IPython shell exists in
    the process (as after another test made one): run_in still raises them to the caller."""
    import ipywidgets
    from IPython.core.interactiveshell import InteractiveShell

    from widgets._display import run_in

    InteractiveShell.instance()
    out = ipywidgets.Output()

    def fail():
        raise RuntimeError("the stage failed")

    with pytest.raises(RuntimeError, match="the stage failed"):
        run_in(out, fail)
    assert run_in(out, lambda x: x + 1, 1) == 2
