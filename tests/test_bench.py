"""Smoke tests of the benchmark scripts (not timed: the numbers they print are measured by hand)."""

import json
import subprocess
import sys

ROOT = __import__("conftest").ROOT


def run(*args, timeout=600):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                         env={**__import__("os").environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_bench_gpu_runs_every_stage_at_the_tiny_shape_on_the_cpu(tmp_path):
    out = run("bench/bench_gpu.py", "--shape", "tiny", "--device", "cpu", "--examples", "12", "--prompts", "2",
              "--k", "3", "--max-new-tokens", "4", "--batch-size", "4", "--out", str(tmp_path / "run"))
    for stage in ("warmup", "training gradients", "rollouts", "LESS validation gradients",
                  "NICE validation gradients", "scores + selection"):
        assert stage in out, stage
    assert "batched vs one at a time" in out and "bare forward+backward" in out
    result = json.loads((tmp_path / "run" / "bench_gpu.json").read_text())
    assert [s["stage"] for s in result["stages"]][:2] == ["warmup", "training gradients"]
    assert all(s["seconds"] > 0 for s in result["stages"])


def test_bench_projection_quick():
    out = run("bench/bench_projection.py", "--quick")
    assert "new" in out and "legacy" in out


def test_bench_scoring_small(tmp_path):
    out = run("bench/bench_scoring.py", "--pool", "3000", "--dim", "256", "--ckpts", "2", "--prompts", "20",
              "--block", "1000", "--out", str(tmp_path), "--clean")
    assert "influence scores (streamed)" in out and "peak RSS" in out
