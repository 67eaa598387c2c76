"""Random projections of gradients (Johnson-Lindenstrauss) and the spec stored beside the vectors.

Two kinds, both scaled so that ``E ||S x||^2 = ||x||^2``:

* ``sjlt`` (default): a sparse JL transform with ``nnz`` non-zeros per input coordinate. The ``dim``
  output rows form ``nnz`` groups of ``w = dim / nnz`` rows; each coordinate adds ``+-x_j / sqrt(nnz)``
  to one row of every group. Cost O(nnz * D) per gradient.
* ``rademacher``: a dense ``dim x D`` matrix of ``+-1 / sqrt(dim)``, as in LESS/TRAK. Cost O(dim * D).

How the sketch is made (generator ``"hash-v1"``, recorded in :class:`ProjectionSpec`)
--------------------------------------------------------------------------------------
Every random choice is a pure integer function of ``(seed, purpose, group, coordinate)``: a counter-
based hash (the bijective 32-bit "lowbias32" mixer, applied twice to the coordinate with salts derived
from the seed, and chained once more per further value) evaluated with plain torch int64 operations,
each product masked to 32 bits (multipliers are stored as signed values of magnitude < 2^31, so no
int64 product overflows). The same ops give the same integers on
the CPU and on a GPU, in any process, for any slicing of the coordinates, so the sketch is generated
on the device that holds the gradients and never on the host per batch. Only the floating-point sums
(their order) differ between devices and batch sizes.

``sjlt``: coordinates are cut into blocks of ``B`` coordinates (``B`` the multiple of ``w`` nearest
above 65,536). In every block and group, the block's coordinates are put in a random order: an
argsort of a 63-bit key per coordinate, a hash in the high bits and the coordinate's index in the
block in the low bits (so keys are distinct and every sort algorithm, on every device, gives the same
order; numpy's on a CPU, torch's on a GPU). The coordinate at position ``p`` goes to row ``p mod w``
of the group, with its own hashed random sign. So within a block every row receives exactly
``B / w`` coordinates (an exactly balanced count sketch), and the projection is one fused
gather-and-sum per bag of ``B / w`` coordinates (``torch.nn.functional.embedding_bag`` with the
signs as per-sample weights): no atomics, no scatter onto the ``dim`` outputs.
Why it is a proper JL sketch: each coordinate's row is uniform over the group's ``w`` rows, two
distinct coordinates share a row with probability ``(B/w - 1) / (B - 1) <= 1/w`` (positions drawn
without replacement: never more often than with independent hashing), and the signs are
independent of the rows and of each other. Hence ``E <Sx, Sy> = <x, y>`` and the variance of
``||Sx||^2``, a sum over colliding pairs, is at most that of the usual sparse JL / OSNAP construction
with ``nnz`` blocks (Kane-Nelson; Nelson-Nguyen): at most ``(2 / dim) ||x||^4``.
The gather indices of each block (int32) and the signs (float32), 8 bytes per coordinate and group,
are computed once and cached on the device up to ``cache_bytes``; chunks beyond the budget are
regenerated at each call (hashing and a sort per block: about 1-2 s per million coordinates at
nnz=8 on one CPU thread, far less on a GPU).

``rademacher``: the entries of coordinate ``j``'s column are the bits of 32-bit hashes of ``(j, word)``,
expanded to +-1 on the device by a 256-entry lookup table, block by block, and multiplied in fp32
(TF32 is switched off for that product). The packed bits (``dim / 8`` bytes per coordinate) are
cached up to ``cache_bytes``; beyond that they are regenerated per call, which costs seconds per
batch at D ~ 1e8 (prefer ``sjlt`` there, or project larger batches at once). At a 7B model's
D = 134,217,728 and d = 8192 the bits are 128 GiB: the default 16 GiB cache keeps 12.5%, and each
call regenerates the rest, expands 4.4 TB of float32 signs and multiplies 2 x b x D x d flops in full
float32 (35 TFLOP at b = 16), by these counts at least 2-4 s per batch on an H200 (README,
"Performance").

Vectors made with the earlier generator (host ``torch.Generator`` streams; specs without a
``generator`` field) are recognised as different: ``check_compatible`` asks to recompute them.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .settings import PROJECTION_KINDS as KINDS  # the projection kinds live with the settings

GENERATOR = "hash-v1"  # the sketch this module computes
LEGACY_GENERATOR = "torch-generator-v0"  # what a stored spec without a ``generator`` field was made with
SJLT_KERNELS = ("bag", "gather")

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_BLOCK_TARGET = 1 << 16  # sjlt: coordinates per balanced block (rounded up to a multiple of dim/nnz)
_CHUNK_TARGET = 1 << 20  # sjlt: coordinates per gather call (a whole number of blocks)
_RADEMACHER_TARGET = 1 << 22  # rademacher: matrix entries expanded per product on a CPU
_RADEMACHER_TARGET_CUDA = 1 << 26  # and on a GPU (fewer, larger kernels)
_PURPOSE = {"key": 1, "rad_a": 4, "rad_c": 5, "rad_word": 6}


def _signed32(c: int) -> int:
    return c - (1 << 32) if c >= 1 << 31 else c


# "lowbias32" multipliers (C. Wellons, hash prospector) as signed values: |x * m| < 2^63 for x < 2^32
_M1, _M2 = _signed32(0x7FEB352D), _signed32(0x846CA68B)


def mix32(x):
    """A 32-bit integer mixer (bijective) on a Python int or an int64 tensor with values in [0, 2^32).

    Exact integer arithmetic, identical on every device: each product is masked to 32 bits.
    """
    if isinstance(x, int):
        x ^= x >> 16
        x = (x * _M1) & _MASK32
        x ^= x >> 15
        x = (x * _M2) & _MASK32
        return x ^ (x >> 16)
    x = x ^ (x >> 16)  # a new tensor: the caller's is left alone
    x.mul_(_M1).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_M2).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 16)


def _salt(seed: int, purpose: str, group: int = 0) -> tuple[int, int]:
    """Two 32-bit salts of a hash stream (Python ints: computed once, on the host, for free)."""
    h = 0x9E3779B9 ^ 1  # the 1 is the generator version (hash-v1)
    for word in (seed & _MASK64, _PURPOSE[purpose], group):
        h = mix32(h ^ (word & _MASK32))
        h = mix32(h ^ (word >> 32))
    return h, mix32(h ^ 0x85EBCA6B)


def _hash(j: torch.Tensor, salt: tuple[int, int]) -> torch.Tensor:
    """32-bit hash (int64 tensor in [0, 2^32)) of coordinates ``j`` (int64, < 2^32) in a salted stream."""
    return mix32(mix32(j ^ salt[0]) ^ salt[1])


@dataclass(frozen=True)
class ProjectionSpec:
    kind: str = "sjlt"
    dim: int = 8192
    seed: int = 0
    input_dim: int = 0  # D, the number of gradient coordinates (set when the model is known)
    nnz: int = 8  # non-zeros per input coordinate (sjlt only)
    generator: str = GENERATOR  # how the random matrix is generated (vectors of two generators differ)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"projection kind must be one of {KINDS}, not {self.kind!r}")
        if self.dim < 1:
            raise ValueError(f"projection dim must be positive, got {self.dim}")
        if self.kind == "sjlt" and (self.nnz < 1 or self.dim % self.nnz):
            raise ValueError(f"sjlt needs nnz >= 1 dividing dim; got dim={self.dim}, nnz={self.nnz}")
        if not 0 <= self.input_dim < 1 << 32:
            raise ValueError(f"projection input_dim must be in [0, 2^32), got {self.input_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProjectionSpec":
        """The spec stored as ``d``; one written before the ``generator`` field names the legacy generator."""
        fields = {k: d[k] for k in ("kind", "dim", "seed", "input_dim", "nnz") if k in d}
        return cls(**fields, generator=d.get("generator", LEGACY_GENERATOR))

    def check_compatible(self, other: "ProjectionSpec", what: str = "vectors") -> None:
        """Refuse to compare vectors made with two different projections."""
        if self == other:
            return
        why = ""
        if self.generator != other.generator:
            why = (f" (random matrix generator {self.generator!r} vs {other.generator!r}: vectors made by "
                   "another version of nice_kit)")
        raise ValueError(f"{what} were projected differently{why}: {self.to_dict()} vs {other.to_dict()}; "
                         "recompute one side with the same projection")


# ---- the sketch as pure integer functions (device-independent)

def sjlt_block_size(spec: ProjectionSpec) -> int:
    """B: coordinates per balanced block (a multiple of ``dim / nnz``)."""
    w = spec.dim // spec.nnz
    return w * -(-_BLOCK_TARGET // w)


def _argsort_rows(keys: torch.Tensor) -> torch.Tensor:
    """Argsort of each row of distinct int64 keys (distinct keys: every sort gives the same order)."""
    if keys.device.type == "cpu":  # numpy's introsort is several times faster than torch.sort on a CPU
        return torch.from_numpy(np.argsort(keys.numpy(), axis=-1))
    return torch.sort(keys, dim=-1).indices


def _sjlt_order(spec: ProjectionSpec, group: int, blk0: int, blk1: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """For blocks ``[blk0, blk1)`` of one group: ``order`` (nb, B) int64, the block-local coordinate
    at each position (a partial last block's padding, local index >= its length, comes last), and
    ``signs`` (nb, B) int8 of each block-local coordinate.

    A coordinate's sort key is ``(hash << bits) | local index`` (63 bits in all): distinct keys, so the
    order does not depend on the sort algorithm or the device.
    """
    B, nb = sjlt_block_size(spec), blk1 - blk0
    bits = (B - 1).bit_length()
    j = torch.arange(blk0 * B, blk1 * B, dtype=torch.int64, device=device)
    salt = _salt(spec.seed, "key", group)
    hi = _hash(j, salt)  # three chained 32-bit hashes of j: the key's high and low bits, the sign
    lo = mix32(hi ^ salt[0])
    signs = (mix32(lo ^ salt[1]) >> 31).to(torch.int8).mul_(-2).add_(1)
    high = ((hi << (31 - bits)) | (lo >> (bits + 1))).masked_fill_(j >= spec.input_dim, (1 << (63 - bits)) - 1)
    order = _argsort_rows(((high << bits) | (j % B)).view(nb, B))
    return order, signs.view(nb, B)


def sjlt_sketch(spec: ProjectionSpec, start: int = 0, stop: int | None = None,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The sjlt sketch of coordinates ``[start, stop)``: ``rows`` (nnz, n) int64 and ``signs`` (nnz, n)
    int8. Coordinate j adds ``signs[k, j] * x_j / sqrt(nnz)`` to output row ``rows[k, j]``, for each k.

    Pure integer function of the spec: the same on every device and in every process.
    """
    stop = spec.input_dim if stop is None else stop
    if spec.kind != "sjlt" or not 0 <= start <= stop <= spec.input_dim:
        raise ValueError(f"sjlt_sketch needs an sjlt spec and 0 <= start <= stop <= {spec.input_dim}")
    B, w = sjlt_block_size(spec), spec.dim // spec.nnz
    blk0, blk1 = start // B, -(-stop // B)
    lo, hi = start - blk0 * B, stop - blk0 * B
    rows, signs = [], []
    for k in range(spec.nnz):
        order, sign = _sjlt_order(spec, k, blk0, blk1, device)
        position = torch.empty_like(order).scatter_(1, order, torch.arange(B, device=order.device).expand_as(order))
        rows.append((position % w + k * w).view(-1)[lo:hi])
        signs.append(sign.view(-1)[lo:hi])
    return torch.stack(rows), torch.stack(signs)


def _sign_table(device) -> torch.Tensor:
    """(256, 8) float32: entry [v, i] is +1 where bit i of byte v is set, else -1."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return (bits * 2 - 1).float().to(device)


def rademacher_bits(spec: ProjectionSpec, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Packed signs of coordinates ``[start, stop)``: (n, ceil(dim / 8)) uint8; bit i of byte q of
    coordinate j is entry ``8 q + i`` of its column (1 means +1). Pure integer function of the spec."""
    if spec.kind != "rademacher" or not 0 <= start <= stop <= spec.input_dim:
        raise ValueError(f"rademacher_bits needs a rademacher spec and 0 <= start <= stop <= {spec.input_dim}")
    j = torch.arange(start, stop, dtype=torch.int64, device=device)
    words = -(-spec.dim // 32)
    a = _hash(j, _salt(spec.seed, "rad_a"))[:, None]
    c = _hash(j, _salt(spec.seed, "rad_c"))[:, None]
    v = _hash(torch.arange(words, dtype=torch.int64, device=device), _salt(spec.seed, "rad_word"))[None, :]
    h = mix32(mix32(a ^ v) ^ c)  # (n, words)
    shifts = torch.arange(0, 32, 8, device=device)
    octets = ((h[:, :, None] >> shifts) & 255).to(torch.uint8).reshape(len(j), 4 * words)
    return octets[:, : -(-spec.dim // 8)].contiguous()


def rademacher_signs(spec: ProjectionSpec, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The +-1 entries (n, dim) int8 of coordinates ``[start, stop)`` (the matrix is this / sqrt(dim))."""
    bits = rademacher_bits(spec, start, stop, device)
    return F.embedding(bits.int(), _sign_table(bits.device)).reshape(len(bits), -1)[:, : spec.dim].to(torch.int8)


# ---- applying the sketch

def default_cache_bytes(device: torch.device | str) -> int:
    """The default sketch cache: a fifth of the device's memory (of the host's on a CPU), at most 16 GiB.

    Enough for a 7B model's LoRA gradients at r=128 (sjlt, nnz=8: 8.6 GB) on an 80 GB GPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 << 30
    return min(16 << 30, total // 5)


@contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """Full fp32 products (no TF32 or bf16 passes), so that vectors agree across devices to fp32 tolerance."""
    before = torch.get_float32_matmul_precision()
    if before != "highest":
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
    else:
        yield


def _copy_transposed(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst`` (n, b) <- ``src`` (b, n).T, converting dtype and device (in column blocks on a CPU: faster)."""
    if dst.device.type == "cpu" and src.device.type == "cpu":
        for i in range(0, src.shape[1], 4096):
            dst[i:i + 4096].copy_(src[:, i:i + 4096].T)
    else:
        dst.copy_(src.T)


class Projector:
    """Applies a :class:`ProjectionSpec` to flat gradients ``(b, D) -> (b, d)`` on ``device``.

    ``cache_bytes`` bounds the sketch kept on the device (default :func:`default_cache_bytes`; 0 keeps
    nothing and regenerates the sketch at each call). ``kernel`` picks the sjlt gather-and-sum:
    ``"bag"`` (fused ``embedding_bag``) or ``"gather"`` (``index_select`` then a reshaped sum); both
    compute the same sketch and differ only in fp32 summation order.
    """

    def __init__(self, spec: ProjectionSpec, device: torch.device | str = "cpu", cache_bytes: int | None = None,
                 *, kernel: str = "bag"):
        if spec.input_dim < 1:
            raise ValueError("ProjectionSpec.input_dim must be set to the gradient size")
        if spec.generator != GENERATOR:
            raise ValueError(f"this nice_kit generates projections with {GENERATOR!r}, not {spec.generator!r}: "
                             "recompute the vectors with the current version")
        if kernel not in SJLT_KERNELS:
            raise ValueError(f"kernel must be one of {SJLT_KERNELS}, not {kernel!r}")
        self.spec = spec
        self.device = torch.device(device)
        self.kernel = kernel
        self.cache_bytes = default_cache_bytes(self.device) if cache_bytes is None else int(cache_bytes)
        self._cache: dict[int, tuple[torch.Tensor, ...]] = {}
        if spec.kind == "sjlt":
            self.block = sjlt_block_size(spec)
            self.chunk = self.block * max(1, _CHUNK_TARGET // self.block)
            chunk_bytes = 8 * spec.nnz * self.chunk  # int32 index + float32 sign per coordinate and group
        else:
            target = _RADEMACHER_TARGET_CUDA if self.device.type == "cuda" else _RADEMACHER_TARGET
            self.chunk = max(1, target // spec.dim)
            chunk_bytes = self.chunk * -(-spec.dim // 8)
        self._cached_chunks = self.cache_bytes // chunk_bytes  # the first chunks are kept, the rest regenerated
        self._table = _sign_table(self.device) if spec.kind == "rademacher" else None

    def _chunk(self, c: int) -> tuple[torch.Tensor, ...]:
        if c in self._cache:
            return self._cache[c]
        build = self._sjlt_chunk if self.spec.kind == "sjlt" else self._rademacher_chunk
        out = build(c)
        if c < self._cached_chunks:
            self._cache[c] = out
        return out

    def _sjlt_chunk(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags of chunk ``c``: (nb * dim, B / w) int32 chunk-local gather indices (the chunk's length
        for padding: a zero row) and float32 signs; bag ``(block, group, row)`` sums into output
        row ``group * w + row``."""
        s, B = self.spec, self.block
        start, stop = c * self.chunk, min((c + 1) * self.chunk, s.input_dim)
        blk0, blk1 = start // B, -(-stop // B)
        nb, w = blk1 - blk0, s.dim // s.nnz
        index = torch.empty(nb, s.nnz, w, B // w, dtype=torch.int32, device=self.device)
        weight = torch.empty(nb, s.nnz, w, B // w, device=self.device)
        base = (torch.arange(nb, device=self.device) * B)[:, None]
        for k in range(s.nnz):  # position p = m * w + r of (block, group k) -> bag (block, k, r), entry m
            order, signs = _sjlt_order(s, k, blk0, blk1, self.device)
            index[:, k] = (order + base).clamp_max_(stop - start).view(nb, B // w, w).transpose(1, 2)
            weight[:, k] = torch.gather(signs, 1, order).view(nb, B // w, w).transpose(1, 2)
        return index.view(nb * s.dim, B // w), weight.view(nb * s.dim, B // w)

    def _rademacher_chunk(self, c: int) -> tuple[torch.Tensor]:
        start, stop = c * self.chunk, min((c + 1) * self.chunk, self.spec.input_dim)
        return (rademacher_bits(self.spec, start, stop, self.device),)

    def _chunks(self, offset: int, n: int) -> Iterator[tuple[int, int, int, int]]:
        """``(chunk, start, lo, hi)`` of the chunks meeting coordinates [offset, offset + n)."""
        for c in range(offset // self.chunk, -(-(offset + n) // self.chunk)):
            start = c * self.chunk
            lo, hi = max(start, offset), min(start + self.chunk, offset + n, self.spec.input_dim)
            if lo < hi:
                yield c, start, lo, hi

    @torch.no_grad()
    def project(self, grads: torch.Tensor, offset: int | None = None) -> torch.Tensor:
        """Project ``grads`` (b, D); returns float32 (b, d) on the projector's device (not normalised).

        With ``offset``, ``grads`` holds only coordinates ``[offset, offset + grads.shape[1])`` and the
        result is that slice's share: the projections of the slices of a gradient sum to its projection.
        """
        s = self.spec
        if grads.dim() != 2:
            raise ValueError(f"expected gradients of shape (b, {s.input_dim}), got {tuple(grads.shape)}")
        n = grads.shape[1]
        if offset is None:
            if n != s.input_dim:
                raise ValueError(f"expected gradients of shape (b, {s.input_dim}), got {tuple(grads.shape)} "
                                 "(pass offset= to project a slice of the coordinates)")
            offset = 0
        if not (0 <= offset and offset + n <= s.input_dim):
            raise ValueError(f"coordinates [{offset}, {offset + n}) are outside the gradient's [0, {s.input_dim})")
        if grads.shape[0] == 0 or n == 0:  # nothing to project: an empty batch, or an empty slice
            return torch.zeros(grads.shape[0], s.dim, device=self.device)
        if s.kind == "sjlt":
            return self._project_sjlt(grads, offset)
        return self._project_rademacher(grads, offset)

    def _project_sjlt(self, grads: torch.Tensor, offset: int) -> torch.Tensor:
        s, B = self.spec, self.block
        b = grads.shape[0]
        out_t = torch.zeros(s.dim, b, device=self.device)  # transposed: one row per output coordinate
        for c, start, lo, hi in self._chunks(offset, grads.shape[1]):
            length = min(start + self.chunk, s.input_dim) - start
            table = torch.empty(length + 1, b, device=self.device)  # chunk's coordinates, then a zero row
            part = grads[:, lo - offset:hi - offset]
            if lo == start and hi == start + length:
                _copy_transposed(table[:length], part)
                table[length].zero_()
            else:
                table.zero_()
                _copy_transposed(table[lo - start:hi - start], part)
            index, weight = self._chunk(c)
            b0, b1 = (lo - start) // B, -(-(hi - start) // B)  # the blocks holding the slice's coordinates
            index, weight = index[b0 * s.dim:b1 * s.dim], weight[b0 * s.dim:b1 * s.dim]
            if self.kernel == "bag":
                sums = F.embedding_bag(index, table, mode="sum", per_sample_weights=weight)
                out_t += sums.view(b1 - b0, s.dim, b).sum(0)
            else:
                picked = table.index_select(0, index.view(-1)).mul_(weight.view(-1, 1))
                out_t += picked.view(b1 - b0, s.dim, -1, b).sum((0, 2))
        return out_t.T.contiguous().mul_(1 / math.sqrt(s.nnz))

    def _project_rademacher(self, grads: torch.Tensor, offset: int) -> torch.Tensor:
        s = self.spec
        out = torch.zeros(grads.shape[0], s.dim, device=self.device)
        with _full_fp32_matmul():
            for c, start, lo, hi in self._chunks(offset, grads.shape[1]):
                (bits,) = self._chunk(c)
                bits = bits[lo - start:hi - start]
                signs = self._table.index_select(0, bits.reshape(-1).int()).view(len(bits), -1)[:, : s.dim]
                part = grads[:, lo - offset:hi - offset].to(self.device, torch.float32)
                out.addmm_(part, signs)
        return out.mul_(1 / math.sqrt(s.dim))


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
