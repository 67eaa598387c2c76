"""The settings layer: a leaf module (no torch, nothing else of nice_kit), each setting's help text
declared once and shown by ``nice-kit config --help`` and docs/settings.md, and ``--set`` overrides."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT
from nice_kit import settings
from nice_kit.cli import main
from nice_kit.config import ConfigError, RunConfig


def test_the_settings_module_imports_no_torch_and_nothing_else_of_nice_kit():
    code = ("import sys, nice_kit.settings as s; s.check_settings(s.RunSettings()); "
            "print(__import__('json').dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('nice_kit'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout) == ["nice_kit", "nice_kit.settings"]


def test_reading_a_config_without_the_model_check_imports_no_torch():
    code = ("import sys; from nice_kit.config import RunConfig; "
            "RunConfig.from_file('configs/default.toml', check_model=False); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_every_setting_has_help_text_and_the_docs_are_generated_from_it():
    rows = settings.setting_rows()
    assert len(rows) > 60 and all(r["help"] for r in rows), [r["setting"] for r in rows if not r["help"]]
    assert {r["setting"] for r in rows} >= {"seed", "rollouts.k", "policy.baseline", "evaluation.max_test"}
    generated = settings.settings_reference()
    assert (ROOT / "docs" / "settings.md").read_text(encoding="utf-8") == generated, \
        "docs/settings.md is stale: python -m nice_kit.settings > docs/settings.md"
    for r in rows:
        assert r["help"].replace("|", "\\|") in generated


def test_config_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as done:
        main(["config", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for r in settings.setting_rows():
        name = r["setting"].split(".")[-1]
        assert f"  {name} = {r['default']}" in text and r["help"] in text


def test_the_names_settings_choose_from_are_the_implementations():
    from nice_kit import evaluation, influence, measurements, policy, projection

    assert tuple(measurements.BUILTIN) == settings.SELECTION_METHODS
    assert evaluation.EVAL_METHODS is settings.EVAL_METHODS and influence.AGGREGATES is settings.AGGREGATES
    assert projection.KINDS is settings.PROJECTION_KINDS and policy.VARIANTS is settings.VARIANTS
    assert settings.RunSettings().projection.kind in settings.PROJECTION_KINDS


def test_a_config_written_as_toml_reads_back_the_same():
    cfg = RunConfig.from_file(ROOT / "configs" / "default.toml", check_model=False)
    cfg.rollouts.stop = ["\n", 'say "hi"\\']
    cfg.metric.params = {"odd key": "é😀", "n": [1, 2.5e-7]}
    cfg.device = "cuda:1"
    again, problems = settings.build(RunConfig, tomllib.loads(settings.to_toml(cfg)), "x")
    assert not problems and dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_set_overrides_one_setting_and_names_itself_in_errors(capsys):
    assert main(["config", "--set", "rollouts.k=4", "--set", "policy.baseline=none", "--set", "seed=3",
                 "--set", "metric.name=length", "--set", "metric.params.max_words=2"]) == 0
    cfg = tomllib.loads(capsys.readouterr().out)
    assert (cfg["rollouts"]["k"], cfg["policy"]["baseline"], cfg["seed"]) == (4, "none", 3)
    assert cfg["metric"] == {"name": "length", "params": {"max_words": 2}}  # the file's params were task_score's
    assert cfg["rollouts"]["temperature"] == 1.0  # the rest of the file stays
    assert main(["config", "--set", "rollouts.k=0"]) == 2
    err = capsys.readouterr().err
    assert "default.toml (with --set rollouts.k): [rollouts] k: must be at least 1, got 0" in err
    with pytest.raises(ConfigError, match="unknown setting"):
        RunConfig.from_file(ROOT / "configs" / "default.toml", sets=[("rollouts.tempreature", 2.0)])
    with pytest.raises(ConfigError, match="seed is a setting, not a table"):
        settings.dotted_overrides([("seed", 1), ("seed.x", 2)])


def test_every_command_that_reads_a_config_takes_set():
    from nice_kit.cli import build_parser

    parser = build_parser()
    for command in ("run", "prepare", "warmup", "train-grads", "val-grads", "rollouts", "score", "select", "evaluate",
                    "lds", "explain"):
        args = parser.parse_args([command, "--set", "rollouts.k=2"])
        assert args.override == [("rollouts.k", 2)], command
    assert parser.parse_args(["what-if", "--set", "policy.baseline=none"]).set == [("policy.baseline", "none")]


def test_python_edits_are_checked_like_a_file():
    cfg = settings.RunSettings()
    cfg.rollouts.k, cfg.selection.methods, cfg.device = 0, ["nice", "trak"], "gpu"
    problems, bad = settings.check_settings(cfg)
    assert dict(problems) == {"[rollouts] k": "must be at least 1, got 0",
                              "[selection] methods": "unknown 'trak'; choose from less, nice",
                              "device": "not a torch device: 'gpu' (cpu, cuda, cuda:1, mps ...)"}
    assert bad == {"rollouts.k", "selection.methods", "device"}
