"""Benchmark of the gradient projection, before and after the on-device hash sketch (prints numbers).

    python bench/bench_projection.py                  # CPU: D = 921,600 (default model) and 16,777,216 (7B, r=16)
    python bench/bench_projection.py --quick          # CI-size smoke run (small D, one repeat)
    python bench/bench_projection.py --device cuda    # on a GPU: timings there + CPU-vs-GPU agreement
    python bench/bench_projection.py --device cuda --shape 7b   # only D of that shape's LoRA gradients

CPU mode: for each D and kind, the legacy projector (nice_kit's before this change, copied below since
it left the package: sketch generated on the host with ``torch.Generator``, cached only below 2^26
entries) and the current one, each measured in its own subprocess so that its peak RSS is its own:
the first call (which builds the sketch) and the mean time per batch after it, in ms, the peak RSS,
and ``|| ||Sx||^2 / ||x||^2 - 1 ||`` as a JL sanity check.

Device mode: the current projector on the device (sjlt with both kernels, and rademacher) at each D
(up to 134,217,728, a 7B model at LoRA r=128), its first call, ms per batch and peak device memory,
and, where D <= --compare-max (default 1,048,576: the CPU's share stays within seconds while the GPU is
held), the largest relative difference from the CPU's projection of the same gradients (same spec:
same integer sketch, only fp32 summation order differs). ``--shape`` (tiny, 1b, 7b, 8b) measures
D = 2^20 (compared with the CPU) and that shape's LoRA gradient size (bench/shapes.py; 7b:
134,217,728).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nice_kit.projection import Projector, ProjectionSpec  # noqa: E402
from shapes import SHAPES  # noqa: E402


def lora_dim(shape: str) -> int:
    """D, the LoRA gradient size of a shape (LoRA on q, k, v, o: r x (in + out) per module)."""
    s = SHAPES[shape]
    h, r = s["hidden_size"], s["lora_r"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    return s["num_hidden_layers"] * r * ((h + h) + 2 * (h + kv) + (h + h))

# ---- the projector as it was before the hash sketch (nice_kit/projection.py at ac846b2), unchanged
_CHUNK = {"sjlt": 1 << 16, "rademacher": 1 << 13}  # input coordinates per generated block
_CACHE_LIMIT = 1 << 26  # cache generated index/sign tensors up to this many entries


class LegacyProjector:
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


# ---- measurements

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gradients(batch: int, D: int, device="cpu") -> torch.Tensor:
    return torch.randn(batch, D, generator=torch.Generator().manual_seed(0)).to(device)


def norm_distortion(x: torch.Tensor, y: torch.Tensor) -> float:
    ratios = y.double().pow(2).sum(1).cpu() / x.double().pow(2).sum(1).cpu()
    return (ratios - 1).abs().max().item()


def worker(impl: str, kind: str, D: int, args) -> dict:
    """One implementation at one size, in this (fresh) process."""
    torch.set_num_threads(args.threads)
    x = gradients(args.batch, D)
    rss_grads = peak_rss_mb()
    spec = ProjectionSpec(kind=kind, dim=args.dim, nnz=args.nnz, seed=0, input_dim=D)
    proj = LegacyProjector(spec) if impl == "legacy" else Projector(spec)
    t0 = time.perf_counter()
    y = proj.project(x)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        proj.project(x)
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "kind": kind, "D": D, "first_s": first, "ms_per_batch": 1000 * sum(times) / len(times),
            "peak_rss_mb": peak_rss_mb(), "rss_gradients_mb": rss_grads, "distortion": norm_distortion(x, y)}


def cpu_mode(args) -> None:
    print(f"CPU, torch {torch.__version__}, {args.threads} thread(s); batch {args.batch}, d={args.dim}, "
          f"nnz={args.nnz}; {args.repeats} timed batch(es) after the first call")
    print(f"{'kind':10s} {'D':>12s} {'impl':8s} {'first call s':>12s} {'ms/batch':>10s} {'peak RSS MB':>12s} "
          f"{'(gradients)':>11s} {'max|ratio-1|':>12s}")
    rows = []
    for D in args.dims:
        for kind in args.kinds:
            for impl in ("legacy", "new"):
                cmd = [sys.executable, __file__, "--worker", impl, kind, str(D), "--batch", str(args.batch),
                       "--dim", str(args.dim), "--nnz", str(args.nnz), "--repeats", str(args.repeats),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    raise RuntimeError(f"worker {impl} {kind} D={D} failed:\n{out.stderr}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(f"{kind:10s} {D:12,d} {impl:8s} {r['first_s']:12.2f} {r['ms_per_batch']:10.1f} "
                      f"{r['peak_rss_mb']:12.0f} {r['rss_gradients_mb']:11.0f} {r['distortion']:12.4f}", flush=True)
            old, new = rows[-2]["ms_per_batch"], rows[-1]["ms_per_batch"]
            print(f"{'':10s} {'':12s} speed-up per batch: {old / new:.1f}x")


def device_mode(args) -> None:
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"device {name}, torch {torch.__version__}; batch {args.batch}, d={args.dim}, nnz={args.nnz}")
    print(f"{'kind':10s} {'kernel':7s} {'D':>12s} {'first call s':>12s} {'ms/batch':>10s} {'peak GB':>8s} "
          f"{'max rel. diff vs CPU':>20s}")
    for D in args.device_dims:
        x = gradients(args.batch, D, device)
        for kind, kernel in (("sjlt", "bag"), ("sjlt", "gather"), ("rademacher", "bag")):
            if kind not in args.kinds:
                continue
            spec = ProjectionSpec(kind=kind, dim=args.dim, nnz=args.nnz, seed=0, input_dim=D)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            proj = Projector(spec, device, kernel=kernel)
            sync()
            t0 = time.perf_counter()
            y = proj.project(x)
            sync()
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                proj.project(x)
            sync()
            ms = 1000 * (time.perf_counter() - t0) / args.repeats
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            diff = "-"
            if D <= args.compare_max:
                ref = Projector(spec, "cpu").project(x.cpu())
                diff = f"{((y.cpu() - ref).abs().max() / ref.abs().max()).item():.2e}"
            print(f"{kind:10s} {kernel if kind == 'sjlt' else '-':7s} {D:12,d} {first:12.2f} {ms:10.1f} {peak:8.2f} "
                  f"{diff:>20s}", flush=True)
            del proj, y
        del x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-size smoke run: small D, one repeat")
    ap.add_argument("--device", help="also run on this device (e.g. cuda) and compare with the CPU")
    ap.add_argument("--dims", type=lambda s: [int(v) for v in s.split(",")], default=[921_600, 16_777_216])
    ap.add_argument("--device-dims", type=lambda s: [int(v) for v in s.split(",")],
                    default=[921_600, 16_777_216, 134_217_728])
    ap.add_argument("--compare-max", type=int, default=1 << 20, help="largest D compared with the CPU")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="measure D = 2^20 and this shape's LoRA gradient size (both modes)")
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=None,
                    help="sjlt,rademacher (default: sjlt on the CPU, both on a device)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--nnz", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "KIND", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, kind, D = args.worker
        print(json.dumps(worker(impl, kind, int(D), args)))
        return
    if args.quick:
        args.dims, args.device_dims, args.repeats, args.dim = [70_000], [70_000], 1, 1024
        args.kinds = ["sjlt", "rademacher"]
    if args.shape:  # the shape's D, and 2^20 (compared with the CPU) when the shape's D is larger
        D = lora_dim(args.shape)
        args.dims = args.device_dims = sorted({min(D, 1 << 20), D})
    torch.set_num_threads(args.threads)
    if args.kinds is None:
        args.kinds = ["sjlt", "rademacher"] if args.device else ["sjlt"]
    if args.device:
        device_mode(args)
    else:
        cpu_mode(args)


if __name__ == "__main__":
    main()
