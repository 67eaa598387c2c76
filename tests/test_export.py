"""Taking a selection out (nice_kit.export): JSONL as the run writes it, a datasets.Dataset for TRL."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from conftest import copy_run
from nice_kit.data import load_records
from nice_kit.export import INSTALL, dataset_rows, selection_ids, selection_records, to_dataset, to_jsonl


@pytest.fixture(scope="module")
def run(fast_run, tmp_path_factory):
    """This module's copy of the session's fast run (it writes selections and what-if parts)."""
    return copy_run(fast_run, tmp_path_factory.mktemp("export") / "run")


def test_the_runs_selection_as_jsonl_is_its_selected_file(run, tmp_path):
    chosen = run.select()
    for method, name in (("nice", "selected.jsonl"), ("less", "selected_less.jsonl")):
        records = selection_records(run, method)
        assert [r["id"] for r in records] == chosen[method]
        path = to_jsonl(records, tmp_path / f"{method}.jsonl")
        assert path.read_bytes() == (run.run_dir / name).read_bytes()
        back = load_records(path, require_response=True)  # nice_kit reads it back as a pool
        assert [r.id for r in back] == chosen[method]


def test_records_are_chat_messages_ending_with_the_response(run):
    by_id = {r.id: r for r in run.pool}
    for rec in selection_records(run, "nice"):
        src = by_id[rec["id"]]
        assert rec["messages"][:-1] == src.messages
        assert rec["messages"][-1] == {"role": "assistant", "content": src.response}
        assert {k: rec[k] for k in src.columns} == src.columns  # the pool's own columns ride along


def test_a_what_if_and_a_filtered_table_export_their_rows(run):
    wi = run.what_if(baseline="none")
    assert selection_ids(run, wi) == wi.selected
    assert [r["id"] for r in selection_records(run, wi)] == wi.selected
    view = pd.DataFrame({"id": [run.pool[3].id, run.pool[0].id], "nice": [0.1, 0.2]})
    assert [r["id"] for r in selection_records(run, view)] == [run.pool[3].id, run.pool[0].id]
    assert [r["id"] for r in selection_records(run, [run.pool[1].id])] == [run.pool[1].id]


def test_bad_selections_say_what_is_wrong(run):
    with pytest.raises(KeyError, match="no pool example with id 'nope'"):
        selection_records(run, ["nope", run.pool[0].id])
    with pytest.raises(ValueError, match="no scores of method 'random'"):
        selection_records(run, "random")
    with pytest.raises(ValueError, match="needs an 'id' column"):
        selection_records(run, pd.DataFrame({"x": [1]}))
    with pytest.raises(TypeError, match="expected a method name"):
        selection_records(run, 3)


def test_nested_columns_become_json_text_for_arrow():
    records = [{"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                "task": "t", "metadata": {"x": 1}},
               {"id": "b", "messages": [{"role": "user", "content": "ho"}, {"role": "assistant", "content": "ya"}],
                "task": "u", "metadata": {"y": "z"}}]
    rows = dataset_rows(records)
    assert [json.loads(r["metadata"]) for r in rows] == [{"x": 1}, {"y": "z"}]
    assert rows[0]["task"] == "t" and rows[0]["messages"] == records[0]["messages"]
    assert records[0]["metadata"] == {"x": 1}  # the input is left alone


def test_to_dataset_without_the_package_names_the_install_command(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what an environment without it gives on import
    with pytest.raises(ImportError, match="nice_kit\\[export\\]"):
        to_dataset(selection_records(run, "nice"))
    assert "pip install" in INSTALL


def test_to_dataset_is_ready_for_sft_chat_training(run, tokenizer):
    import datasets

    records = selection_records(run, "nice")
    ds = to_dataset(records)
    assert isinstance(ds, datasets.Dataset)
    assert len(ds) == len(records) and ds["id"] == [r["id"] for r in records]
    assert "messages" in ds.column_names
    first = ds[0]["messages"]
    assert first == records[0]["messages"]
    # what TRL's SFTTrainer does with a "messages" column: the tokenizer's chat template over the turns
    text = tokenizer.apply_chat_template(first, tokenize=False)
    assert records[0]["messages"][-1]["content"] in text and records[0]["messages"][0]["content"] in text
    # and a what-if's selection the same way
    wi = run.what_if(baseline="none")
    assert to_dataset(selection_records(run, wi))["id"] == wi.selected
