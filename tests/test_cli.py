import subprocess
import sys

import pandas as pd

ROOT = __import__("conftest").ROOT


def nice_kit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nice_kit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_help_lists_every_stage():
    out = nice_kit("--help")
    assert out.returncode == 0
    for cmd in ("run", "prepare", "warmup", "train-grads", "val-grads", "rollouts", "score", "select", "evaluate", "metrics"):
        assert cmd in out.stdout


def _config(tmp_path, small_data, model_dir, **extra):
    lines = [f'model = "{model_dir}"', "threads = 1", "[data]"]
    lines += [f'{k} = "{v}"' for k, v in small_data.items()] + ["max_length = 64"]
    lines += ["[warmup]", "fraction = 0.5", "epochs = 2", "lr = 0.01", "[projection]", "dim = 256",
              "[gradients]", "chunk_size = 8", "[rollouts]", "k = 4", "max_new_tokens = 6", "temperature = 1.5",
              "[metric]", 'name = "length"', "params = { max_words = 3 }"]
    path = tmp_path / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_then_stages_from_the_command_line(tmp_path, small_data, tiny_model_dir):
    cfg = _config(tmp_path, small_data, tiny_model_dir)
    run_dir = tmp_path / "run"
    out = nice_kit("run", "--config", str(cfg), "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Selection diagnostics" in out.stdout and "harmful_share" in out.stdout
    scores = pd.read_csv(run_dir / "scores.csv")
    assert list(scores.columns) == ["id", "less", "nice"]
    assert (run_dir / "selected.jsonl").exists() and (run_dir / "selected_less.jsonl").exists()
    # a stage on its own reuses what is there
    out = nice_kit("select", "--config", str(cfg), "--run-dir", str(run_dir), "--fraction", "0.25")
    assert out.returncode == 0, out.stderr[-2000:]
    assert len((run_dir / "selected_nice.jsonl").read_text().splitlines()) == 6
    out = nice_kit("train-grads", "--config", str(cfg), "--run-dir", str(run_dir), "--shard", "5/2")
    assert out.returncode == 2 and "shard" in out.stderr


def test_clear_errors_for_bad_config_and_data(tmp_path, small_data, tiny_model_dir):
    bad = tmp_path / "bad.toml"
    bad.write_text("[warmup]\nepochz = 3\n")
    out = nice_kit("prepare", "--config", str(bad), "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "unknown setting(s) ['epochz']" in out.stderr and "Traceback" not in out.stderr
    broken = tmp_path / "pool.jsonl"
    broken.write_text(open(small_data["pool"]).readline() + '{"id": "x", "prompt": "q"}\n')
    cfg = _config(tmp_path, {**small_data, "pool": str(broken)}, tiny_model_dir)
    out = nice_kit("prepare", "--config", str(cfg), "--run-dir", str(tmp_path / "r2"))
    assert out.returncode == 2 and f"{broken}:2" in out.stderr and "missing the response" in out.stderr


def test_metrics_command_lists_registered_metrics():
    out = nice_kit("metrics")
    assert out.returncode == 0 and "task_score" in out.stdout and "label-free" in out.stdout


def test_reading_commands_refuse_a_run_directory_that_does_not_exist(tmp_path, small_data, tiny_model_dir):
    cfg = _config(tmp_path, small_data, tiny_model_dir)
    for cmd in ("score", "select", "evaluate"):
        out = nice_kit(cmd, "--config", str(cfg), "--run-dir", str(tmp_path / "runz"))
        assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr, cmd
        assert not (tmp_path / "runz").exists()  # no mistyped directory created
