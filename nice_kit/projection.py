"""Random projections of gradients (Johnson-Lindenstrauss) and the spec stored beside the vectors.

* ``sjlt`` (default): a sparse JL transform. Each input coordinate is sent, with a random sign, to
  one row in each of ``nnz`` blocks of the output (``dim / nnz`` rows a block). Cost O(nnz * D) per
  gradient: milliseconds where a dense matrix costs seconds.
* ``rademacher``: a dense d x D matrix of +-1/sqrt(d), as in LESS/TRAK.

The matrix is generated on the CPU in fixed chunks of input coordinates from ``(seed, chunk)``, so
the same spec gives the same projection on any device, in any process, sharded or not.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

KINDS = ("sjlt", "rademacher")
_CHUNK = {"sjlt": 1 << 16, "rademacher": 1 << 13}  # input coordinates per generated block
_CACHE_LIMIT = 1 << 26  # cache generated index/sign tensors up to this many entries


@dataclass(frozen=True)
class ProjectionSpec:
    kind: str = "sjlt"
    dim: int = 8192
    seed: int = 0
    input_dim: int = 0  # D, the number of gradient coordinates (set when the model is known)
    nnz: int = 8  # non-zeros per input coordinate (sjlt only)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"projection kind must be one of {KINDS}, not {self.kind!r}")
        if self.dim < 1:
            raise ValueError(f"projection dim must be positive, got {self.dim}")
        if self.kind == "sjlt" and (self.nnz < 1 or self.dim % self.nnz):
            raise ValueError(f"sjlt needs nnz >= 1 dividing dim; got dim={self.dim}, nnz={self.nnz}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProjectionSpec":
        return cls(**{k: d[k] for k in ("kind", "dim", "seed", "input_dim", "nnz") if k in d})

    def check_compatible(self, other: "ProjectionSpec", what: str = "vectors") -> None:
        """Refuse to compare vectors made with two different projections."""
        if self != other:
            raise ValueError(f"{what} were projected differently: {self.to_dict()} vs {other.to_dict()}; "
                             "recompute one side with the same projection")


class Projector:
    """Applies a :class:`ProjectionSpec` to batches of flat gradients ``(b, D) -> (b, d)``."""

    def __init__(self, spec: ProjectionSpec, device: torch.device | str = "cpu", cache: bool = True):
        if spec.input_dim < 1:
            raise ValueError("ProjectionSpec.input_dim must be set to the gradient size")
        self.spec = spec
        self.device = torch.device(device)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        entries = spec.input_dim * (spec.nnz if spec.kind == "sjlt" else spec.dim)
        self.cache = cache and entries <= _CACHE_LIMIT

    def _generator(self, chunk: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.spec.seed * 1_000_003 + chunk) % (2**63 - 1))
        return g

    def _block(self, chunk: int, size: int):
        if chunk in self._cache:
            return self._cache[chunk]
        g = self._generator(chunk)
        s = self.spec
        if s.kind == "sjlt":
            width = s.dim // s.nnz
            rows = torch.randint(0, width, (s.nnz, size), generator=g) + (torch.arange(s.nnz) * width)[:, None]
            signs = (torch.randint(0, 2, (s.nnz, size), generator=g) * 2 - 1).float() / math.sqrt(s.nnz)
            block = (rows.to(self.device), signs.to(self.device))
        else:
            mat = (torch.randint(0, 2, (size, s.dim), generator=g, dtype=torch.int8) * 2 - 1)
            block = (mat.to(self.device), None)
        if self.cache:
            self._cache[chunk] = block
        return block

    @torch.no_grad()
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """Project ``grads`` of shape (b, D); returns float32 (b, d) (not normalised)."""
        s = self.spec
        if grads.dim() != 2 or grads.shape[1] != s.input_dim:
            raise ValueError(f"expected gradients of shape (b, {s.input_dim}), got {tuple(grads.shape)}")
        grads = grads.to(self.device, torch.float32)
        out = torch.zeros(grads.shape[0], s.dim, device=self.device)
        size = _CHUNK[s.kind]
        for chunk, start in enumerate(range(0, s.input_dim, size)):
            g = grads[:, start:start + size]
            a, b = self._block(chunk, g.shape[1])
            if s.kind == "sjlt":
                for k in range(s.nnz):
                    out.index_add_(1, a[k], g * b[k])
            else:
                out += g @ a.float()
        if s.kind == "rademacher":
            out /= math.sqrt(s.dim)
        return out


def normalize_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit length (zero rows stay zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def save_spec(spec: ProjectionSpec, directory: Path) -> None:
    (directory / "projection.json").write_text(json.dumps(spec.to_dict(), indent=1))


def load_spec(directory: Path) -> ProjectionSpec:
    path = directory / "projection.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no projection spec beside the stored vectors")
    return ProjectionSpec.from_dict(json.loads(path.read_text()))
