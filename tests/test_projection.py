import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nice_kit.projection as projection
from nice_kit.projection import (LEGACY_GENERATOR, Projector, ProjectionSpec, load_spec, mix32, normalize_rows,
                                 rademacher_bits, rademacher_signs, save_spec, sjlt_block_size, sjlt_sketch)

ROOT = Path(__file__).resolve().parent.parent
EPS32 = torch.finfo(torch.float32).eps


def exact_projection(spec: ProjectionSpec, x: torch.Tensor, magnitudes: bool = False) -> torch.Tensor:
    """float64 projection through the integer description of the sketch (independent of the kernels);
    ``magnitudes``: of |x| through |S|, the sum of the magnitudes of each output's terms."""
    x = x.double().abs() if magnitudes else x.double()
    if spec.kind == "rademacher":
        signs = rademacher_signs(spec, 0, spec.input_dim).double()
        return x @ (signs.abs() if magnitudes else signs) / math.sqrt(spec.dim)
    rows, signs = sjlt_sketch(spec)
    out = torch.zeros(x.shape[0], spec.dim, dtype=torch.float64)
    for k in range(spec.nnz):
        out.index_add_(1, rows[k], x * (1 if magnitudes else signs[k].double()))
    return out / math.sqrt(spec.nnz)


def assert_fp32_close(a: torch.Tensor, b: torch.Tensor, spec: ProjectionSpec, x: torch.Tensor) -> None:
    """Equal up to the error fp32 sums may have in any summation order: 16 eps * sum of |terms| of
    each output (batch sizes, kernels, devices and CPUs order the sums differently)."""
    err = (a.double() - b.double()).abs()
    tol = 16 * EPS32 * exact_projection(spec, x, magnitudes=True)
    assert (err <= tol).all(), f"error {err.max():.3g} exceeds the fp32 summation tolerance ({(err / tol).max():.2f}x)"


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of one sjlt block or 2^18 rademacher entries, so that small inputs span several chunks
    (the chunks group the work; the sketch does not depend on them)."""
    monkeypatch.setattr(projection, "_CHUNK_TARGET", 1)
    monkeypatch.setattr(projection, "_RADEMACHER_TARGET", 1 << 18)


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
def test_projection_preserves_cosines(kind):
    torch.manual_seed(0)
    D = 20_000
    base = torch.randn(1, D)
    x = torch.cat([base + s * torch.randn(1, D) for s in (0.3, 1.0, 3.0)] + [torch.randn(5, D)])
    exact = normalize_rows(x) @ normalize_rows(x).T
    p = Projector(ProjectionSpec(kind=kind, dim=2048, seed=3, input_dim=D))
    y = normalize_rows(p.project(x))
    approx = y @ y.T
    assert (approx - exact).abs().max() < 0.1  # JL: error ~ 1/sqrt(d)


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
def test_same_spec_same_projection_and_linearity(kind, small_chunks):
    # fp32 sums may round differently with the batch size (MKL on AVX512 does): compare with the
    # tolerance fp32 summation allows, and against a float64 projection through the integer sketch
    D = 150_001 if kind == "sjlt" else 20_001  # sjlt: 3 blocks (chunks here), the last one partial
    spec = ProjectionSpec(kind=kind, dim=256, seed=5, nnz=4, input_dim=D)
    torch.manual_seed(0)
    x = torch.randn(4, D)
    a = Projector(spec).project(x)
    assert a.dtype == torch.float32 and a.shape == (4, 256) and a.is_contiguous()
    assert_fp32_close(a, exact_projection(spec, x), spec, x)
    for other in (Projector(spec, cache_bytes=0), Projector(spec, kernel="gather")):
        assert_fp32_close(other.project(x), a, spec, x)
    assert_fp32_close(Projector(spec).project(x[:2]), a[:2], spec, x[:2])  # rows are independent
    assert_fp32_close(Projector(spec).project(2 * x[:1] - x[3:]), 2 * a[:1] - a[3:], spec, 3 * x[:1].abs() + x[3:].abs())
    other = Projector(ProjectionSpec(kind=kind, dim=256, seed=6, nnz=4, input_dim=D)).project(x)
    assert (other - a).abs().max() > 0.1 * a.abs().max()


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
def test_cache_budget_changes_nothing(kind, small_chunks):
    D = 140_000 if kind == "sjlt" else 9_000
    spec = ProjectionSpec(kind=kind, dim=128, seed=2, nnz=2, input_dim=D)
    x = torch.randn(3, D)
    full = Projector(spec)
    results = [full.project(x), full.project(x)]  # built, then from the cache
    one_chunk = sum(t.numel() * t.element_size() for t in full._cache[0])
    partial = Projector(spec, cache_bytes=one_chunk * 3 // 2)
    results.append(partial.project(x))
    assert 0 < len(partial._cache) < len(full._cache)
    uncached = Projector(spec, cache_bytes=0)
    results.append(uncached.project(x))
    assert not uncached._cache
    for r in results[1:]:
        assert_fp32_close(r, results[0], spec, x)
    for c, cached in full._cache.items():  # the integers themselves: cached or regenerated, the same
        assert all(torch.equal(a, b) for a, b in zip(cached, uncached._chunk(c)))


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
@pytest.mark.parametrize("chunks", ["default", "small"])
def test_projections_of_slices_sum_to_the_whole(kind, chunks, monkeypatch):
    if chunks == "small":
        monkeypatch.setattr(projection, "_CHUNK_TARGET", 1)
        monkeypatch.setattr(projection, "_RADEMACHER_TARGET", 1 << 18)
    D = 140_003 if kind == "sjlt" else 12_003
    spec = ProjectionSpec(kind=kind, dim=128, seed=7, nnz=8, input_dim=D)
    torch.manual_seed(1)
    x = torch.randn(3, D)
    p = Projector(spec)
    whole = p.project(x)
    B = sjlt_block_size(spec) if kind == "sjlt" else 4096
    gen = torch.Generator().manual_seed(0)
    slicings = [[0, D], [0, 1, D - 1, D], [0, B - 1, B, B + 1, 2 * B + 5, D],
                sorted({0, D, *torch.randint(0, D, (9,), generator=gen).tolist()})]
    for cuts in slicings:
        total = sum(p.project(x[:, a:b], offset=a) for a, b in zip(cuts[:-1], cuts[1:]))
        assert_fp32_close(total, whole, spec, x)
    # a slice is the projection of the gradient zeroed outside it
    a, b = B - 3, B + 11
    masked = torch.zeros_like(x)
    masked[:, a:b] = x[:, a:b]
    assert_fp32_close(p.project(x[:, a:b], offset=a), p.project(masked), spec, x)
    assert p.project(x[:, :0], offset=D).abs().max() == 0


def test_sjlt_is_exactly_balanced_in_every_block():
    spec = ProjectionSpec(kind="sjlt", dim=96, nnz=4, seed=1, input_dim=200_000)
    B, w = sjlt_block_size(spec), 24
    assert B % w == 0 and B >= 1 << 16
    rows, signs = sjlt_sketch(spec)
    assert rows.shape == signs.shape == (4, spec.input_dim)
    for k in range(spec.nnz):
        assert ((rows[k] >= k * w) & (rows[k] < (k + 1) * w)).all()
        for start in range(0, spec.input_dim, B):
            counts = torch.bincount(rows[k, start:start + B] - k * w, minlength=w)
            if start + B <= spec.input_dim:
                assert (counts == B // w).all()  # every row gets exactly B / w coordinates of the block
            else:  # the partial last block: as even as possible
                assert counts.max() - counts.min() <= 1 and counts.sum() == spec.input_dim - start
    assert set(signs.unique().tolist()) == {-1, 1}
    assert abs(signs.double().mean()) < 0.01
    # groups and blocks use different permutations: rows of one group do not predict another's
    assert (rows[0] % w == rows[1] % w).double().mean() < 2.0 / w


def test_mix32_is_exact_32_bit_arithmetic():
    def reference(x: int) -> int:  # unsigned constants, Python big ints, explicit mod 2^32
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    values = [0, 1, 2, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 0x12345678, 0xDEADBEEF]
    values += torch.randint(0, 2**32, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    out = mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert out == [reference(v) for v in values] == [mix32(v) for v in values]
    assert len(set(out)) == len(set(values))  # a bijection


def _sketch_digest(kind: str, start: int, stop: int) -> str:
    if kind == "sjlt":
        spec = ProjectionSpec(kind="sjlt", dim=64, nnz=4, seed=11, input_dim=140_000)
        rows, signs = sjlt_sketch(spec, start, stop)
        data = rows.to(torch.int32).numpy().tobytes() + signs.numpy().tobytes()
    else:
        spec = ProjectionSpec(kind="rademacher", dim=100, seed=11, input_dim=140_000)
        data = rademacher_bits(spec, start, stop).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


DIGEST_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_projection import _sketch_digest
print(json.dumps([_sketch_digest(k, a, b) for k, a, b in {cases!r}]))
"""


def test_sketch_is_the_same_in_another_process_and_for_every_shard_split():
    cases = [("sjlt", 0, 140_000), ("sjlt", 65_530, 70_000), ("rademacher", 0, 140_000), ("rademacher", 3, 9)]
    script = DIGEST_SCRIPT.format(tests=str(ROOT / "tests"), cases=cases)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert json.loads(out.stdout) == [_sketch_digest(*c) for c in cases]
    # every split of the coordinates gives the same integers as the whole
    spec = ProjectionSpec(kind="sjlt", dim=64, nnz=4, seed=11, input_dim=140_000)
    rows, signs = sjlt_sketch(spec)
    rspec = ProjectionSpec(kind="rademacher", dim=100, seed=11, input_dim=140_000)
    bits = rademacher_bits(rspec, 0, 140_000)
    for cuts in ([0, 70_000, 140_000], [0, 1, 65_535, 65_537, 131_071, 140_000], [0, 33_333, 100_001, 140_000]):
        parts = [sjlt_sketch(spec, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
        assert torch.equal(torch.cat([p[0] for p in parts], 1), rows)
        assert torch.equal(torch.cat([p[1] for p in parts], 1), signs)
        assert torch.equal(torch.cat([rademacher_bits(rspec, a, b) for a, b in zip(cuts[:-1], cuts[1:])]), bits)


def test_hash_v1_sketch_is_pinned():
    # regression pin of the integer sketch that vectors marked generator="hash-v1" were made with:
    # a change here must come with a new generator name (stored vectors would silently change meaning)
    assert _sketch_digest("sjlt", 0, 1000)[:16] == PINNED["sjlt"]
    assert _sketch_digest("rademacher", 0, 1000)[:16] == PINNED["rademacher"]


PINNED = {"sjlt": "04d6ceef910dd7a4", "rademacher": "55fe09f1dd2f4dd1"}


@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
def test_norms_and_inner_products_are_preserved_within_jl_distortion(kind):
    D, d = (60_000, 1024) if kind == "sjlt" else (8_000, 512)
    spec = ProjectionSpec(kind=kind, dim=d, seed=4, nnz=8, input_dim=D)
    p = Projector(spec)
    torch.manual_seed(2)
    w = d // 8
    structured = torch.stack([torch.ones(D),  # a large coordinate sum
                              (torch.arange(D) % w == 0).float(),  # period dim/nnz
                              torch.where(torch.arange(D) < 5000, 1.0, 0.0),  # inside one block
                              torch.randn(D).abs()])
    x = torch.cat([torch.randn(40, D), structured])
    y = p.project(x).double()
    sigma = math.sqrt(2 / d)  # std of ||Sx||^2 / ||x||^2 (at most, for both kinds)
    ratios = y.pow(2).sum(1) / x.double().pow(2).sum(1)
    assert (ratios - 1).abs().max() < 5 * sigma
    assert abs(ratios[:40].mean() - 1) < 5 * sigma / math.sqrt(40)
    # inner products: std of <Sx, Sy> - <x, y> is at most sqrt((|x|^2 |y|^2 + <x, y>^2) / d)
    xd = x.double()
    exact, approx = xd @ xd.T, y @ y.T
    norms = xd.pow(2).sum(1)
    std = ((norms[:, None] * norms[None, :] + exact.pow(2)) / d).sqrt()
    assert ((approx - exact).abs() / std).max() < 5
    z = ((approx - exact) / std)[:40, :40]
    assert abs(z[~torch.eye(40, dtype=torch.bool)].mean()) < 0.5  # no bias


def test_spec_validation_and_mismatch(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        ProjectionSpec(kind="gaussian")
    with pytest.raises(ValueError, match="nnz"):
        ProjectionSpec(dim=10, nnz=4)
    with pytest.raises(ValueError, match="input_dim"):
        ProjectionSpec(input_dim=2**32)
    a = ProjectionSpec(dim=256, seed=1, input_dim=10)
    save_spec(a, tmp_path)
    assert load_spec(tmp_path) == a and a.generator == "hash-v1"
    with pytest.raises(ValueError, match="projected differently"):
        load_spec(tmp_path).check_compatible(ProjectionSpec(dim=256, seed=2, input_dim=10))
    with pytest.raises(ValueError, match=r"shape \(b, 10\)"):
        Projector(a).project(torch.zeros(1, 11))
    with pytest.raises(ValueError, match="offset="):
        Projector(a).project(torch.zeros(1, 9))
    with pytest.raises(ValueError, match=r"\[5, 11\) are outside"):
        Projector(a).project(torch.zeros(1, 6), offset=5)
    with pytest.raises(ValueError, match="kernel"):
        Projector(a, kernel="scatter")


def test_vectors_of_the_earlier_generator_must_be_recomputed(tmp_path):
    # a spec written before the generator field (today's main) describes other random matrices
    old = {"kind": "sjlt", "dim": 256, "seed": 0, "input_dim": 10, "nnz": 8}
    (tmp_path / "projection.json").write_text(json.dumps(old))
    stored = load_spec(tmp_path)
    assert stored.generator == LEGACY_GENERATOR
    current = ProjectionSpec(dim=256, seed=0, input_dim=10, nnz=8)
    with pytest.raises(ValueError, match="generator.*recompute"):
        stored.check_compatible(current, "train vectors")
    with pytest.raises(ValueError, match="recompute"):
        Projector(stored)


def test_normalize_rows_keeps_zero_rows_zero():
    out = normalize_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))



@pytest.mark.parametrize("kind", ["sjlt", "rademacher"])
def test_an_empty_batch_projects_to_an_empty_result(kind):
    spec = ProjectionSpec(kind=kind, dim=64, seed=0, input_dim=1000, nnz=4 if kind == "sjlt" else 8)
    out = Projector(spec).project(torch.zeros(0, 1000))
    assert out.shape == (0, 64) and out.dtype == torch.float32
    assert Projector(spec).project(torch.zeros(3, 0), offset=10).abs().sum() == 0
