"""Config validation: every mistake is found when the config is read, before any model is loaded,
with the file and the setting named (one test per mistake)."""

import json
import socket
from pathlib import Path

import pytest

from conftest import ROOT, write_jsonl
from nice_kit.config import (ConfigError, RunConfig, check_targets, merge_settings, metric_columns,
                             validate_config)
from nice_kit.data import DataError, load_records


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Reading a config must never load a model or touch the network."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a model or tokenizer was loaded while reading a config")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: refuse())


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text('model = "SmolLM2-135M-Instruct"\n' + text)
    return path


def config_error(tmp_path: Path, text: str) -> tuple[Path, str]:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        RunConfig.from_file(path)
    return path, str(err.value)


def test_the_bundled_configs_are_valid():
    cfg = RunConfig.from_file(ROOT / "configs" / "default.toml")
    validate_config(cfg)
    assert cfg.data.reference_columns[:2] == ["answer", "tests"] and cfg.data.columns == {}


def test_stop_given_as_a_string(tmp_path):
    path, msg = config_error(tmp_path, '[rollouts]\nstop = "Answer"\n')
    assert f"{path}: [rollouts] stop: expected a list of strings, got the string 'Answer'" in msg


def test_warmup_fraction_zero(tmp_path):
    path, msg = config_error(tmp_path, "[warmup]\nfraction = 0\n")
    assert f"{path}: [warmup] fraction: must be a fraction in (0, 1]" in msg and "got 0" in msg


def test_projection_dim_not_a_number(tmp_path):
    path, msg = config_error(tmp_path, '[projection]\ndim = "abc"\n')
    assert f"{path}: [projection] dim: expected an integer, got the string 'abc'" in msg


@pytest.mark.parametrize("section", ["warmup", "gradients", "rollouts", "evaluation"])
def test_batch_size_zero(tmp_path, section):
    path, msg = config_error(tmp_path, f"[{section}]\nbatch_size = 0\n")
    assert f"{path}: [{section}] batch_size: must be at least 1, got 0" in msg


def test_seed_not_an_integer(tmp_path):
    path, msg = config_error(tmp_path, 'seed = "zero"\n')
    assert f"{path}: seed: expected an integer, got the string 'zero'" in msg


def test_unknown_metric_parameter(tmp_path):
    path, msg = config_error(tmp_path, '[metric]\nname = "length"\nparams = { max_chars = 3 }\n')
    assert f"{path}: [metric] params: metric 'length' has no parameter 'max_chars'" in msg
    assert "max_words (default 5)" in msg


def test_metric_parameter_of_the_wrong_type_or_value(tmp_path):
    path, msg = config_error(tmp_path, '[metric]\nname = "length"\nparams = { max_words = "abc" }\n')
    assert f"{path}: [metric] params.max_words: expected an integer, got the string 'abc'" in msg
    path, msg = config_error(tmp_path, '[metric]\nname = "task_score"\nparams = { extract = "fuzzy" }\n')
    assert f"{path}: [metric] params.extract: expected one of 'strict', 'last_number', got the string 'fuzzy'" in msg
    path, msg = config_error(tmp_path, '[metric]\nname = "format"\nparams = { pattern = "(" }\n')
    assert f"{path}: [metric] params: pattern '(' is not a valid regular expression" in msg


def test_missing_model_path(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "./models/nowhere"\n')
    with pytest.raises(ConfigError) as err:
        RunConfig.from_file(path)
    assert f"{path}: model: ./models/nowhere: no such model folder" in str(err.value)
    assert "SmolLM2-135M-Instruct" in str(err.value)  # says what works offline


def test_unknown_model_name_says_at_once_that_nothing_is_downloaded(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "some-org/some-model-7b"\n')
    with pytest.raises(ConfigError) as err:
        RunConfig.from_file(path)  # the socket is blocked: a hub lookup would fail differently
    msg = str(err.value)
    assert f"{path}: model: 'some-org/some-model-7b' is neither a local folder nor a model in the local" in msg
    assert "never downloads" in msg and "names that work offline: SmolLM2-135M-Instruct" in msg
    cfg = RunConfig.from_file(path, check_model=False)  # a config for another machine can still be read
    assert cfg.model == "some-org/some-model-7b"


def test_model_path_relative_to_the_config_file(tmp_path, tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "run.toml"
    path.write_text('model = "../models/tiny"\n')
    assert Path(RunConfig.from_file(path).model).resolve() == (tmp_path / "models" / "tiny").resolve()


def test_rollouts_k_zero(tmp_path):
    path, msg = config_error(tmp_path, "[rollouts]\nk = 0\n")
    assert f"{path}: [rollouts] k: must be at least 1, got 0" in msg


def test_policy_topk_zero(tmp_path):
    path, msg = config_error(tmp_path, '[policy]\nvariant = "topk"\ntopk = 0\n')
    assert f"{path}: [policy] topk: must be at least 1, got 0" in msg


def test_selection_fraction_above_one(tmp_path):
    path, msg = config_error(tmp_path, "[selection]\nfraction = 2\n")
    assert f"{path}: [selection] fraction: must be a fraction in (0, 1] (1 = all), got 2" in msg


def test_warmup_epochs_zero(tmp_path):
    path, msg = config_error(tmp_path, "[warmup]\nepochs = 0\n")
    assert f"{path}: [warmup] epochs: must be at least 1, got 0" in msg


@pytest.mark.parametrize("text, expected", [
    ('[policy]\nvariant = "vanila"\n', "[policy] variant: unknown 'vanila' (did you mean 'vanilla'?); choose from "
                                        "vanilla, rejection, topk"),
    ('[policy]\nbaseline = "average"\n', "[policy] baseline: unknown 'average'"),
    ('[selection]\naggregate = "max"\n', "[selection] aggregate: unknown 'max'"),
    ('[selection]\nmethods = ["nice", "trak"]\n', "[selection] methods: unknown 'trak'"),
    ('[evaluation]\nmethods = ["random", "best"]\n', "[evaluation] methods: unknown 'best'"),
    ('[projection]\nkind = "gaussian"\n', "[projection] kind: unknown 'gaussian'"),
    ('[metric]\nname = "exact_matc"\n', "[metric] name: unknown metric 'exact_matc'; did you mean 'exact_match'?"),
])
def test_bad_names(tmp_path, text, expected):
    path, msg = config_error(tmp_path, text)
    assert f"{path}: {expected}" in msg


def test_unknown_setting_suggests_the_known_one(tmp_path):
    path, msg = config_error(tmp_path, "[rollouts]\ntempreature = 1.2\n")
    assert f"{path}: [rollouts]: unknown setting(s) ['tempreature'] (did you mean 'tempreature' -> 'temperature'?)" \
        in msg
    path, msg = config_error(tmp_path, "[rollout]\nk = 2\n")
    assert f"{path}: unknown setting(s) ['rollout'] (did you mean 'rollout' -> 'rollouts'?)" in msg
    path, msg = config_error(tmp_path, 'metric = "length"\n')
    assert f"{path}: [metric]: expected a table of settings, got the string 'length'" in msg


def test_label_free_with_a_metric_that_needs_references(tmp_path):
    path, msg = config_error(tmp_path, '[data]\nlabel_free = true\n[metric]\nname = "task_score"\n')
    assert f"{path}: [data] label_free: label-free mode withholds reference answers, but the metric 'task_score' " \
           "needs them (it reads answer)" in msg
    # a metric reading a column listed as a reference column is refused too
    path, msg = config_error(tmp_path, '[data]\nlabel_free = true\nreference_columns = ["answer", "gold"]\n'
                                       '[metric]\nname = "exact_match"\nparams = { column = "gold" }\n')
    assert "it reads gold" in msg


def test_label_free_contradictions(tmp_path):
    path, msg = config_error(tmp_path, '[data]\nlabel_free = true\n[metric]\nname = "length"\n'
                                       '[policy]\nvariant = "rejection"\n[selection]\nmethods = ["less"]\n')
    assert f"{path}: [policy] variant: the rejection variant" in msg
    assert f"{path}: [selection] methods: LESS needs reference answers" in msg


def test_projection_dim_not_divisible_by_nnz(tmp_path):
    path, msg = config_error(tmp_path, "[projection]\nkind = \"sjlt\"\ndim = 1000\nnnz = 16\n")
    assert f"{path}: [projection] nnz: the sjlt projection needs nnz to divide dim" in msg
    write_config(tmp_path, "[projection]\nkind = \"rademacher\"\ndim = 1000\nnnz = 16\n")
    assert RunConfig.from_file(tmp_path / "run.toml").projection.dim == 1000  # nnz is sjlt's only


def test_policy_settings_that_give_no_gradient(tmp_path):
    path, msg = config_error(tmp_path, '[rollouts]\nk = 1\n[policy]\nbaseline = "mean"\n')
    assert f"{path}: [rollouts] k: the 'mean' baseline needs at least 2 completions" in msg
    path, msg = config_error(tmp_path, '[rollouts]\nk = 4\n[policy]\nvariant = "topk"\ntopk = 8\n')
    assert f"{path}: [policy] topk: keeps the best 8 of rollouts.k = 4" in msg


@pytest.mark.parametrize("text, expected", [
    ('threads = "many"\n', 'threads: must be a positive integer or "auto", got the string \'many\''),
    ("threads = 0\n", "threads: must be at least 1, got 0"),
    ('device = "gpu0"\n', "device: not a torch device: 'gpu0'"),
    ("[data]\nmax_length = 2\n", "[data] max_length: must be at least 8, got 2"),
    ("[data]\nlabel_free = 1\n", "[data] label_free: expected true or false, got the integer 1"),
    ('[data]\ncolumns = { prompt = "q", response = "q" }\n', "[data] columns: reads one of your columns twice"),
    ("[lora]\ndropout = 1.0\n", "[lora] dropout: must be at least 0 and below 1, got 1.0"),
    ("[lora]\nr = 8.5\n", "[lora] r: expected an integer, got the number 8.5"),
    ("[warmup]\nlr = -1e-4\n", "[warmup] lr: must be greater than 0, got -0.0001"),
    ("[rollouts]\ntemperature = 0\n", "[rollouts] temperature: must be greater than 0, got 0"),
    ("[rollouts]\ntop_p = 1.5\n", "[rollouts] top_p: must be a fraction in (0, 1]"),
    ('[rollouts]\nstop = ["", "x"]\n', "[rollouts] stop: holds an empty string"),
    ("[evaluation]\nseeds = []\n", "[evaluation] seeds: must not be empty"),
    ("[evaluation]\nmax_test = -1\n", "[evaluation] max_test: must be at least 0, got -1"),
])
def test_other_types_and_ranges(tmp_path, text, expected):
    path, msg = config_error(tmp_path, text)
    assert f"{path}: {expected}" in msg


def test_every_problem_is_reported_at_once(tmp_path):
    path, msg = config_error(tmp_path, 'seed = "zero"\n[warmup]\nepochs = 0\n[rollouts]\nstop = "A"\nk = 0\n')
    assert msg.startswith("4 problems in the config:")
    for setting in ("seed", "[warmup] epochs", "[rollouts] stop", "[rollouts] k"):
        assert f"{path}: {setting}:" in msg


def test_invalid_toml_and_overrides(tmp_path):
    path = write_config(tmp_path, "[warmup\n")
    with pytest.raises(ConfigError, match=f"{path}: invalid TOML"):
        RunConfig.from_file(path)
    path = write_config(tmp_path, "[warmup]\nepochs = 3\n")
    cfg = RunConfig.from_file(path, overrides={"warmup": {"lr": 1e-3}, "metric": {"name": "length", "params": {}}})
    assert (cfg.warmup.epochs, cfg.warmup.lr, cfg.metric.name) == (3, 1e-3, "length")
    with pytest.raises(ConfigError, match=r"\[warmup\] epochs: must be at least 1"):
        RunConfig.from_file(path, overrides={"warmup": {"epochs": 0}})
    assert merge_settings({"metric": {"params": {"a": 1}}}, {"metric": {"params": {"b": 2}}}) == \
        {"metric": {"params": {"b": 2}}}


def test_from_dict_and_configs_built_in_python():
    with pytest.raises(ConfigError, match=r"^config: \[rollouts\] stop: expected a list of strings"):
        RunConfig.from_dict({"rollouts": {"stop": "Answer"}})
    cfg = RunConfig.from_dict({"metric": {"name": "length", "params": {"max_words": 2}}})

    def vowels(prompts, completions, **columns):
        return [float(sum(ch in "aeiou" for ch in c)) for c in completions]

    cfg.metric.name = vowels  # a metric given as a function is allowed in Python
    cfg.data.pool = ROOT / "data" / "arith" / "pool.jsonl"  # and paths as pathlib.Path
    validate_config(cfg)
    cfg.rollouts.k = -3
    with pytest.raises(ConfigError, match=r"^notebook: \[rollouts\] k: must be at least 1, got -3"):
        validate_config(cfg, "notebook")


# ---------------------------------------------------------------------------------------------------
# What the metric needs of the target records, checked before any stage runs


def targets(tmp_path, rows, name="val.jsonl"):
    return load_records(write_jsonl(tmp_path / name, rows), require_response=False)


def test_a_target_record_without_the_column_its_metric_needs(tmp_path):
    rows = [{"id": "a", "prompt": "2*3?", "response": "6", "task": "products", "answer": "6"},
            {"id": "b", "prompt": "2*4?", "response": "8", "task": "products"}]
    recs = targets(tmp_path, rows)
    cfg = RunConfig.from_dict({"metric": {"name": "task_score"}})
    with pytest.raises(DataError) as err:
        check_targets(recs, cfg, tmp_path / "val.jsonl")
    assert f"{tmp_path / 'val.jsonl'}:2 (id b): no column 'answer', which the metric 'task_score' reads" in str(err.value)
    cfg = RunConfig.from_dict({"metric": {"name": "exact_match", "params": {"column": "gold"}}})
    with pytest.raises(DataError, match=r"val.jsonl:1 \(id a\): no column 'gold'"):
        check_targets(recs, cfg)


def test_an_unknown_task_is_found_before_the_rollouts(tmp_path):
    rows = [{"id": "a", "prompt": "2*3?", "response": "6", "task": "products", "answer": "6"},
            {"id": "b", "prompt": "2*4?", "response": "8", "task": "prodcts", "answer": "8"}]
    recs = targets(tmp_path, rows)
    with pytest.raises(DataError) as err:
        check_targets(recs, RunConfig.from_dict({}), tmp_path / "val.jsonl")
    assert f"{tmp_path / 'val.jsonl'}:2 (id b): task 'prodcts' has no reasoning-gym scorer; did you mean 'products'" \
        in str(err.value)


def test_subtask_column_typo_and_partly_missing(tmp_path):
    rows = [{"id": "a", "prompt": "x", "response": "6", "task": "products", "answer": "6"},
            {"id": "b", "prompt": "y", "response": "8", "answer": "8"}]
    path = write_config(tmp_path, '[data]\nsubtask_column = "tsak"\n[metric]\nname = "length"\n')
    cfg = RunConfig.from_file(path)
    with pytest.raises(ConfigError) as err:
        check_targets(targets(tmp_path, rows), cfg, tmp_path / "val.jsonl")
    assert f"{path}: [data] subtask_column: no record of {tmp_path / 'val.jsonl'} has the column 'tsak'; did you " \
           "mean 'task'?" in str(err.value)
    cfg.data.subtask_column = "task"
    with pytest.raises(DataError, match=r"val.jsonl:2 \(id b\): no 'task' column \(data.subtask_column\)"):
        check_targets(targets(tmp_path, rows), cfg, tmp_path / "val.jsonl")
    cfg.data.subtask_column = ""  # one task: nothing to check
    check_targets(targets(tmp_path, rows), cfg, tmp_path / "val.jsonl")
    # without any subtask column at the default name, all prompts are one task (as before)
    check_targets(targets(tmp_path, [{"id": "a", "prompt": "x"}]), RunConfig.from_dict({"metric": {"name": "length"}}))


def test_every_bad_record_is_listed(tmp_path):
    rows = [{"id": str(i), "prompt": "x", "task": "products"} for i in range(12)]
    with pytest.raises(DataError) as err:
        check_targets(targets(tmp_path, rows), RunConfig.from_dict({}), "val.jsonl")
    assert str(err.value).startswith("12 problems in the target records:") and "... and 2 more" in str(err.value)


def test_the_bundled_targets_pass():
    cfg = RunConfig.from_file(ROOT / "configs" / "default.toml")
    for path in (cfg.data.target_val, cfg.data.target_test):
        check_targets(load_records(path), cfg, path)


def test_metric_columns_withhold_references_in_label_free_mode(tmp_path):
    rows = [{"id": "a", "prompt": "x", "response": "6", "task": "products", "answer": "6", "tests": "assert 1"},
            {"id": "b", "prompt": "y", "response": "8", "task": "sums", "note": "n"}]
    recs = targets(tmp_path, rows)
    cols, passed, withheld = metric_columns(recs, RunConfig.from_dict({}))
    assert passed == ["answer", "note", "response", "task", "tests"] and withheld == []
    assert cols["answer"] == ["6", None] and cols["response"] == ["6", "8"] and cols["task"] == ["products", "sums"]
    lf = RunConfig.from_dict({"data": {"label_free": True}, "metric": {"name": "length"}})
    cols, passed, withheld = metric_columns(recs, lf)
    assert passed == ["note", "task"] and withheld == ["answer", "tests"] and set(cols) == {"note", "task"}
    lf.data.reference_columns = ["answer", "tests", "note"]
    assert metric_columns(recs, lf)[1] == ["task"]


# ---------------------------------------------------------------------------------------------------
# The paper's settings


def test_paper_config_has_the_reference_settings():
    with pytest.raises(ConfigError, match="never downloads"):  # its placeholder model is not here
        RunConfig.from_file(ROOT / "configs" / "paper.toml")
    cfg = RunConfig.from_file(ROOT / "configs" / "paper.toml", check_model=False)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (128, 512, 0.1)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    w = cfg.warmup
    assert (w.lr, w.epochs, w.fraction, w.batch_size * w.grad_accum, w.warmup_ratio) == (2e-5, 4, 0.05, 128, 0.03)
    r = cfg.rollouts
    assert (r.k, r.temperature, r.top_k, r.top_p) == (20, 1.2, 50, 0.95)
    assert (cfg.policy.estimator, cfg.policy.variant, cfg.policy.baseline) == ("reference", "vanilla", "none")
    assert (cfg.projection.kind, cfg.projection.dim, cfg.projection.seed) == ("sjlt", 8192, 0)
    assert (cfg.selection.fraction, cfg.data.max_length) == (0.05, 2048)
    assert Path(cfg.data.pool).exists()


def test_paper_config_runs_end_to_end_on_a_tiny_model(tiny_model_dir, tokenizer, small_data, tmp_path, monkeypatch):
    monkeypatch.undo()  # the pipeline itself may build models (tiny ones, from a config)
    from nice_kit.models import tiny_model
    from nice_kit.pipeline import Pipeline

    # overrides for size only (2 checkpoints instead of 4, fewer and shorter samples, a small
    # projection), and a metric a random tiny model gets varied rewards from
    size = {"model": str(tiny_model_dir), "threads": 1, "data": small_data, "projection": {"dim": 256},
            "warmup": {"epochs": 2}, "rollouts": {"k": 4, "max_new_tokens": 6, "batch_size": 64},
            "gradients": {"batch_size": 8, "chunk_size": 16},
            "metric": {"name": "length", "params": {"max_words": 3}}}
    cfg = RunConfig.from_file(ROOT / "configs" / "paper.toml", overrides=size)
    assert (cfg.lora.r, cfg.policy.estimator, cfg.policy.baseline, cfg.data.max_length) == (128, "reference", "none", 2048)
    for path in (cfg.data.target_val, cfg.data.target_test):
        check_targets(load_records(path, require_response=False), cfg, path)
    p = Pipeline(cfg, tmp_path / "run", model=tiny_model(tokenizer), tokenizer=tokenizer, verbose=False)
    p.run()
    scores = p.scores()
    assert list(scores.columns) == ["id", "less", "nice"] and len(scores) == 24
    assert scores[["less", "nice"]].notna().all().all() and scores["nice"].abs().sum() > 0
    chosen = json.loads(json.dumps(p.select()))
    assert len(chosen["nice"]) == max(1, round(0.05 * 24))


def test_whitespace_stop_strings_are_allowed():
    from nice_kit.config import RunConfig

    cfg = RunConfig.from_dict({"rollouts": {"stop": ["\n", "\n\n"]}}, check_model=False)
    assert cfg.rollouts.stop == ["\n", "\n\n"]
