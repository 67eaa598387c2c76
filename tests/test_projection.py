import pytest
import torch

from nice_kit.projection import Projector, ProjectionSpec, load_spec, normalize_rows, save_spec


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
def test_same_spec_same_projection_and_linearity(kind):
    D = 70_000  # spans several generation chunks
    spec = ProjectionSpec(kind=kind, dim=256, seed=5, input_dim=D)
    x = torch.randn(4, D)
    a = Projector(spec).project(x)
    b = Projector(spec, cache=False).project(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(Projector(spec).project(x[:2]), a[:2])  # rows are independent
    other = Projector(ProjectionSpec(kind=kind, dim=256, seed=6, input_dim=D)).project(x)
    assert not torch.allclose(a, other)


def test_spec_validation_and_mismatch(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        ProjectionSpec(kind="gaussian")
    with pytest.raises(ValueError, match="nnz"):
        ProjectionSpec(dim=10, nnz=4)
    a = ProjectionSpec(dim=256, seed=1, input_dim=10)
    save_spec(a, tmp_path)
    assert load_spec(tmp_path) == a
    with pytest.raises(ValueError, match="projected differently"):
        load_spec(tmp_path).check_compatible(ProjectionSpec(dim=256, seed=2, input_dim=10))
    with pytest.raises(ValueError, match=r"shape \(b, 10\)"):
        Projector(a).project(torch.zeros(1, 11))


def test_normalize_rows_keeps_zero_rows_zero():
    out = normalize_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
