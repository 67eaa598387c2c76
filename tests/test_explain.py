"""Explaining a score (nice_kit.explain): the terms add up to the stored score, the completions to
their prompt's term, the per-completion gradients are a cached, checked stage; the CLI and the "why"
panel show them.

One tiny run (a random tiny Llama saved like a Hugging Face model, so the command line opens the
same run) is shared by the module."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import nice_kit.explain as explain_mod
import nice_kit.stages as stages_mod
from nice_kit.config import RunConfig
from nice_kit.explain import check_decomposition, completion_vectors, explain, format_explanation, score_terms
from nice_kit.influence import influence_scores
from nice_kit.models import tiny_model
from nice_kit.pipeline import Pipeline
from nice_kit.runs import StaleResultError

ROOT = __import__("conftest").ROOT
SCORE_TOL = 1e-6  # the stored scores are float32 sums of d products; here they are summed in float64


def _toml(path, data, model_dir, policy: dict | None = None, metric_words: int = 3, aggregate: str = "max_of_means"):
    lines = [f'model = "{model_dir}"', "threads = 1", "[data]"]
    lines += [f'{k} = "{v}"' for k, v in data.items()] + ["max_length = 64"]
    lines += ["[warmup]", "fraction = 0.5", "epochs = 2", "lr = 0.01", "batch_size = 4", "[projection]", "dim = 256",
              "[gradients]", "chunk_size = 8", "batch_size = 4", "[rollouts]", "k = 4", "max_new_tokens = 6",
              "temperature = 1.5", "[metric]", 'name = "length"', f"params = {{ max_words = {metric_words} }}",
              "[selection]", f'aggregate = "{aggregate}"']
    if policy:
        lines += ["[policy]"] + [f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {str(v).lower()}"
                                 for k, v in policy.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _open(toml, run_dir, tokenizer) -> Pipeline:
    return Pipeline(RunConfig.from_file(toml), run_dir, model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)


@pytest.fixture(scope="module")
def made(tokenizer, small_data, tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain")
    toml = _toml(folder / "tiny.toml", small_data, tiny_model_dir)
    p = _open(toml, folder / "run", tokenizer)
    p.run()
    return p, toml


@pytest.fixture(scope="module")
def run(made):
    return made[0]


# ------------------------------------------------------------------------------------ the terms
def test_score_terms_reproduce_influence_scores_on_random_vectors():
    """Independent of any run: random unit vectors, two checkpoints, three subtasks, masked prompts."""
    gen = torch.Generator().manual_seed(0)

    def unit(n, d):
        x = torch.randn(n, d, generator=gen)
        return x / x.norm(dim=1, keepdim=True)

    train, val = [unit(50, 16), unit(50, 16)], [unit(7, 16), unit(7, 16)]
    subtasks = ["a", "b", "a", "c", "b", "c", "c"]
    valid = torch.tensor([True, True, False, True, True, True, False])
    cos = np.stack([(t.double() @ v.double().T).numpy() for t, v in zip(train, val)], axis=1)
    for aggregate in ("max_of_means", "mean"):
        expected = influence_scores(train, val, [0.3, 0.7], subtasks, valid, aggregate)
        weights, means, winner, names = score_terms(cos, [0.3, 0.7], subtasks, valid.numpy(), aggregate)
        np.testing.assert_allclose((weights * cos).sum(axis=(1, 2)), expected, rtol=0, atol=1e-6)
        assert (weights[:, :, ~valid.numpy()] == 0).all()  # masked prompts never count
        assert names == ["a", "b", "c"]
        if aggregate == "mean":
            assert (winner == -1).all() and np.allclose(weights[:, :, valid.numpy()], np.array([0.3, 0.7])[:, None] / 5)
        else:
            np.testing.assert_allclose(means.max(axis=1), expected, atol=1e-6)
            for b in range(len(expected)):  # only the winner's valid prompts carry weight, w_c / its size
                own = np.array([s == names[winner[b]] for s in subtasks]) & valid.numpy()
                assert np.allclose(weights[b][:, own], np.array([[0.3], [0.7]]) / own.sum())
                assert (weights[b][:, ~own] == 0).all()
        assert len(set(winner.tolist())) > 1 or aggregate == "mean"  # the test exercises several winners


@pytest.mark.parametrize("aggregate", ["max_of_means", "mean"])
@pytest.mark.parametrize("method", ["less", "nice"])
def test_contributions_add_up_to_the_stored_score_for_every_example(made, tokenizer, small_data, tiny_model_dir,
                                                                    tmp_path, method, aggregate):
    p, toml = made
    if aggregate != p.cfg.selection.aggregate:  # the same run with the other aggregate: only scores change
        toml = _toml(tmp_path / "agg.toml", small_data, tiny_model_dir, aggregate=aggregate)
        p = _open(toml, p.run_dir, tokenizer)
    stored = p.scores().set_index("id")[method]
    for rid, score in stored.items():
        e = explain(p, rid, method, compute=False)
        assert e.score == pytest.approx(score, abs=1e-7)  # what scores.csv holds
        assert abs(e.total - score) <= SCORE_TOL, (rid, e.total, score)
        assert e.aggregate == aggregate
        # weights: w_c / size of the winning subtask's counted prompts (or of all counted prompts)
        w = dict(zip(e.prompts["epoch"], e.prompts["checkpoint_weight"]))
        counted = e.prompts[e.prompts["counted"]]
        if aggregate == "mean":
            n = counted["prompt_id"].nunique()
            assert np.allclose(counted["weight"], counted["epoch"].map(w) / n)
            assert not e.subtasks["won"].any() and e.subtasks["in_score"].all()
        else:
            won = e.subtasks.loc[e.subtasks["mean"].idxmax()]
            assert e.winner == won["subtask"] and e.subtasks["won"].sum() == 1
            inside = counted["subtask"] == e.winner
            assert np.allclose(counted.loc[inside, "weight"], counted.loc[inside, "epoch"].map(w) / won["prompts"])
            assert (counted.loc[~inside, "weight"] == 0).all()
            assert won["mean"] == pytest.approx(score, abs=SCORE_TOL)
        assert (e.prompts.loc[~e.prompts["counted"], "weight"] == 0).all()
        np.testing.assert_allclose(e.prompts["contribution"], e.prompts["weight"] * e.prompts["cosine"])
    check = check_decomposition(p, method, completions=False)
    assert check["id"].tolist() == stored.index.tolist()
    assert check["difference"].abs().max() <= SCORE_TOL
    _open(made[1], p.run_dir, tokenizer).scores()  # leave config.json and scores.csv as the fixture made them


def test_cosines_are_those_of_the_stored_rows(run):
    rid = run.pool[3].id
    e = explain(run, rid, "less")
    train, val = run.stored_vectors("train"), run.stored_vectors("less")
    for c, ckpt in enumerate(run.checkpoints):
        got = e.prompts.loc[e.prompts["epoch"] == ckpt.epoch, "cosine"].to_numpy()
        np.testing.assert_allclose(got, (train[c].row(3) @ val[c].all().T).numpy(), atol=1e-6)
    assert e.completions is None and "no completions" in e.note


# ------------------------------------------------------------------------------- completions
def test_completion_shares_add_up_to_their_prompt_within_the_float16_tolerance(run):
    rid = run.pool[0].id
    e = run.explain(rid, "nice")
    comp = e.completions
    rollouts = run.rollouts()
    assert len(comp) == len(rollouts)  # vanilla + mean baseline: no reference rows
    assert set(comp["kind"]) == {"completion"}
    merged = comp.merge(rollouts.assign(prompt_id=rollouts["prompt_id"].astype(str)),
                        on=["epoch", "prompt_id", "sample"])
    assert (merged["text"] == merged["completion"]).all() and np.allclose(merged["reward_x"], merged["reward_y"])
    # a completion with a zero policy weight has no gradient and no share
    zero = comp["policy_weight"] == 0
    assert zero.any() and not zero.all()
    assert (comp.loc[zero, "gradient_norm"] == 0).all() and (comp.loc[zero, "contribution"] == 0).all()
    assert (comp.loc[~zero & (comp["n_tokens"] > 0), "gradient_norm"] > 0).all()
    check = e.completion_check()
    assert (check["difference"].abs() <= check["tolerance"]).all(), check
    counted = check[e.prompts["weight"].to_numpy() != 0]
    assert (counted["contribution"] != 0).all() and (counted["completions"] != 0).all()  # not vacuous


def test_completion_gradients_add_up_to_the_stored_prompt_gradient(run):
    """sum_k P(a_k g_k) = P G_j: the per-completion stage against the NICE stage, coordinate by coordinate."""
    parts = completion_vectors(run, "nice", compute=True)  # computed here unless an earlier test did
    val = run.stored_vectors("nice")
    for (table, vecs), v in zip(parts, val):
        rows = vecs.all().double() * torch.from_numpy(vecs.norms).double()[:, None]
        for j, pid in enumerate(v.ids):
            mask = torch.tensor((table["prompt_id"] == pid).tolist())
            total = rows[mask].sum(dim=0)
            prompt = v.row(j).double() * float(v.norms[j])
            scale = rows[mask].norm(dim=1).sum()
            assert (total - prompt).norm() <= 2 * 2.0 ** -11 * (scale + v.norms[j]) + 1e-12


def test_check_decomposition_covers_every_example_and_its_completions(run):
    check = check_decomposition(run, "nice")
    assert len(check) == len(run.pool)
    assert check["difference"].abs().max() <= SCORE_TOL
    assert (check["completion_ratio"] <= 1).all() and check["completion_difference"].max() > 0


def test_completion_gradients_are_read_back_without_the_model(run, tokenizer, monkeypatch):
    run.explain(run.pool[1].id, "nice")  # computed (if not yet)

    def boom(*a, **k):
        raise AssertionError("recomputed the per-completion gradients")

    monkeypatch.setattr(stages_mod, "projected_gradients", boom)
    from widgets import open_run

    fresh = open_run(run.run_dir)
    e = fresh.explain(run.pool[1].id, "nice")
    assert not fresh.holds_model and e.completions is not None
    pd.testing.assert_frame_equal(e.completions, run.explain(run.pool[1].id, "nice").completions)


def test_a_stale_completion_stage_is_refused_by_a_reader_and_recomputed_on_request(run, monkeypatch):
    real = explain_mod.completion_inputs
    monkeypatch.setattr(explain_mod, "completion_inputs", lambda *a: {**real(*a), "changed": 1})
    with pytest.raises(StaleResultError, match="per-completion gradients"):
        completion_vectors(run, "nice", compute=False)
    e = explain(run, run.pool[2].id, "nice", compute=False)
    assert e.completions is None and "per-completion gradients" in e.note
    calls = {"n": 0}
    real_gg = stages_mod.projected_gradients

    def counting(*a, **k):
        calls["n"] += 1
        return real_gg(*a, **k)

    monkeypatch.setattr(stages_mod, "projected_gradients", counting)
    e = explain(run, run.pool[2].id, "nice")  # compute=True: recomputed under the new key
    assert calls["n"] > 0 and (e.completion_check()["difference"].abs() <= e.completion_check()["tolerance"]).all()


def test_completion_stage_resumes_and_does_not_depend_on_chunk_or_batch_size(made, tokenizer, small_data,
                                                                             tiny_model_dir, tmp_path, monkeypatch):
    p, _ = made
    reference = completion_vectors(p, "nice")
    shutil.copytree(p.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("val_nice_completions"))
    toml = _toml(tmp_path / "small.toml", small_data, tiny_model_dir)
    toml.write_text(toml.read_text().replace("chunk_size = 8", "chunk_size = 5").replace("batch_size = 4\n[rollouts]",
                                                                                         "batch_size = 3\n[rollouts]"))
    q = _open(toml, tmp_path / "run", tokenizer)
    assert q.cfg.gradients.chunk_size == 5 and q.cfg.gradients.batch_size == 3
    real, calls = stages_mod.projected_gradients, {"n": 0}

    def fail_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("interrupted")
        return real(*a, **k)

    monkeypatch.setattr(stages_mod, "projected_gradients", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        completion_vectors(q, "nice")
    stage = tmp_path / "run" / "grads" / "val_nice_completions" / "epoch_1"
    kept = sorted(x.name for x in stage.glob("chunk_*.safetensors"))
    assert kept and not (stage / "DONE").exists()
    monkeypatch.setattr(stages_mod, "projected_gradients", real)
    before = {x: (stage / x).stat().st_mtime_ns for x in kept}
    again = completion_vectors(q, "nice")
    assert {x: (stage / x).stat().st_mtime_ns for x in kept} == before  # finished chunks were not redone
    for (t1, v1), (t2, v2) in zip(reference, again):
        pd.testing.assert_frame_equal(t1.drop(columns=["token_ids"]), t2.drop(columns=["token_ids"]))
        np.testing.assert_allclose(v2.norms, v1.norms, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(v2.all(), v1.all(), rtol=0, atol=2e-3)  # float16 unit rows


def test_reference_fallback_gets_its_own_row(made, tokenizer, small_data, tiny_model_dir, tmp_path):
    """The rejection variant: prompts where no completion reaches the reference answer's reward fall back
    to the reference; its gradient is a row of its own, and the shares still add up."""
    p, _ = made
    shutil.copytree(p.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("val_nice*"))
    toml = _toml(tmp_path / "rej.toml", small_data, tiny_model_dir, metric_words=2,
                 policy={"variant": "rejection", "baseline": "none"})
    q = _open(toml, tmp_path / "run", tokenizer)
    q.validation_gradients("nice")
    q.scores()
    rid = q.pool[0].id
    e = q.explain(rid, "nice")
    refs = e.completions[e.completions["kind"] == "reference"]
    kept = e.completions[(e.completions["kind"] == "completion") & (e.completions["policy_weight"] != 0)]
    assert len(refs) > 0 and len(kept) > 0  # both kinds of prompt in this run
    by_id = {r.id: r for r in q.target_val}
    assert all(t == by_id[pid].response for pid, t in zip(refs["prompt_id"], refs["text"]))
    assert (refs["sample"] == -1).all() and (refs["gradient_norm"] > 0).all() and (refs["reward"] == 1).all()
    for (epoch, pid), _ in refs.groupby(["epoch", "prompt_id"]):  # a fallback prompt: only the reference counts
        own = e.completions[(e.completions["epoch"] == epoch) & (e.completions["prompt_id"] == pid)]
        assert (own.loc[own["kind"] == "completion", "policy_weight"] == 0).all()
    check = e.completion_check()
    assert (check["difference"].abs() <= check["tolerance"]).all()
    assert check_decomposition(q, "nice")["completion_ratio"].max() <= 1
    assert abs(e.total - e.score) <= SCORE_TOL


def test_unknown_example_and_missing_scores_are_clear_errors(run, tmp_path):
    with pytest.raises(KeyError, match="no pool example with id 'nope'"):
        explain(run, "nope", "nice")
    fresh = Pipeline(run.cfg, tmp_path / "empty", verbose=False)
    with pytest.raises(RuntimeError, match="warmup|scores"):
        explain(fresh, run.pool[0].id, "nice")


# ------------------------------------------------------------------------------------ printing
def test_format_lists_the_top_contributions_and_completions(run):
    e = run.explain(run.pool[0].id, "nice")
    text = format_explanation(e, top=3)
    top = e.by_prompt()
    pid = e.top_prompt()
    assert pid == top.loc[top["contribution"].abs().idxmax(), "prompt_id"]
    assert f"Top prompt {pid}" in text and f"{e.score:+.6g}" in text
    assert "Top 3 of" in text and "policy_weight" in text
    first = e.prompts.loc[e.prompts["contribution"].abs().idxmax()]
    assert first["prompt_id"] in text


def _cli(*args):
    import os

    return subprocess.run([sys.executable, "-m", "nice_kit.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def test_cli_explain_and_check(made):
    p, toml = made
    rid = p.pool[0].id
    out = _cli("explain", rid, "--method", "nice", "--top", "4", "--config", str(toml), "--run-dir", str(p.run_dir))
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"nice score of {rid}" in out.stdout and "Top prompt" in out.stdout
    out = _cli("explain", "--check", "--method", "less", "--config", str(toml), "--run-dir", str(p.run_dir))
    assert out.returncode == 0, out.stderr[-2000:]
    diff = float(out.stdout.split("stored score| = ")[1].split()[0])
    assert f"{len(p.pool)} examples" in out.stdout and diff <= SCORE_TOL
    out = _cli("explain", "--check", "--method", "nice", "--config", str(toml), "--run-dir", str(p.run_dir))
    assert out.returncode == 0 and "completions:" in out.stdout, out.stderr[-2000:]
    out = _cli("explain", "--config", str(toml), "--run-dir", str(p.run_dir))
    assert out.returncode == 2 and "needs a pool example ID" in out.stderr


# ------------------------------------------------------------------------------------ the panel
def test_why_panel_shows_the_prompts_and_the_top_prompts_completions(run):
    import html

    from widgets.why import WhyPanel, why_panel

    rid = run.pool[0].id
    panel = why_panel(run, rid, "nice")
    e = panel.explanation
    assert isinstance(panel, WhyPanel) and e.example_id == rid
    bars = panel.bars.data[0]
    per = e.by_prompt()
    per = per[per["contribution"] != 0]
    assert len(bars.x) == len(per)
    assert dict(zip(bars.customdata, bars.x)) == pytest.approx(dict(zip(per["prompt_id"], per["contribution"])))
    colours = dict(zip(bars.customdata, bars.marker.color))
    assert {colours[pid] for pid in per.loc[per["contribution"] > 0, "prompt_id"]} <= {panel.UP}
    assert {colours[pid] for pid in per.loc[per["contribution"] < 0, "prompt_id"]} <= {panel.DOWN}
    assert all(s in " ".join(bars.y) for s in per["subtask"])
    pid = e.top_prompt()
    assert panel.prompt.value == pid
    body = panel.completions.value
    comp = e.completions_of(pid)
    for t in comp["text"]:
        assert html.escape(" ".join(t.split())[:40]) in body
    rewarded, punished = comp[comp["policy_weight"] > 0], comp[comp["policy_weight"] < 0]
    assert len(rewarded) and len(punished)
    assert body.index("nice-why-rewarded") < body.index("nice-why-punished")
    assert "var(--jp-" in panel.style.value and "#f3f3f3" not in panel.style.value
    # another example, another method
    other = run.pool[5].id
    panel.show(other, "less")
    assert panel.explanation.example_id == other and panel.explanation.method == "less"
    assert "no completions" in panel.completions.value
    assert other in panel._repr_html_()
    # what an embedding explorer calls: errors are shown, not raised
    assert panel.show("no-such-id", "nice", raise_errors=False) is None
    assert "cannot explain the nice score of no-such-id" in panel.header.value and len(panel.bars.data[0].x) == 0
    assert "no pool example with id" in panel.header.value and panel.chart.layout.display == "none"
    with pytest.raises(KeyError):
        panel.show("no-such-id", "nice")


def test_why_panel_offers_to_compute_missing_completion_gradients(made, tokenizer, small_data, tiny_model_dir,
                                                                  tmp_path):
    from widgets.why import WhyPanel

    p, _ = made
    shutil.copytree(p.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("val_nice_completions"))
    q = _open(_toml(tmp_path / "t.toml", small_data, tiny_model_dir), tmp_path / "run", tokenizer)
    panel = WhyPanel(q, q.pool[0].id, "nice", compute=False)
    assert panel.explanation.completions is None and panel.compute_button.layout.display != "none"
    assert len(panel.bars.data[0].x) > 0 and "no completions" in panel.completions.value
    panel.compute_button.click()  # loads the model (here the tiny one in memory) and stores the gradients
    assert panel.explanation.completions is not None and panel.compute_button.layout.display == "none"
    assert "could not" not in panel.status.value and (tmp_path / "run" / "grads" / "val_nice_completions").exists()
    assert "nice-why-rewarded" in panel.completions.value or "nice-why-punished" in panel.completions.value
