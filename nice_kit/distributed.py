"""Running the pipeline on several processes: ``torchrun`` (one or many machines, SLURM) or ``accelerate launch``.

    torchrun --nproc-per-node 4 -m nice_kit run --config C --run-dir D

Each process finds its place from the environment the launcher sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), joins a ``torch.distributed`` process group (NCCL for CUDA
tensors and gloo for CPU ones on a GPU machine, gloo alone on a CPU) and runs on ``cuda:LOCAL_RANK``
(or the CPU). Without a launcher :func:`init_from_env` returns :data:`SINGLE`: no process group, and
every method here does nothing or calls its function directly, so the pipeline runs exactly as
before.

How the stages share the work (the run directory lives on a file system every process sees):

* warmup: data-parallel, the LoRA gradients summed across processes after each micro-batch round
  (:func:`nice_kit.warmup.train_lora`); rank 0 writes the checkpoints;
* gradient and rollout stages: chunk ``c`` is computed by the rank with ``c % world == rank``; rank 0
  merges once every chunk exists;
* scores, selection, diagnostics: rank 0, the others wait and receive its result.

Rank 0 opens every stage folder first (:meth:`Dist.main_first`), so no rank ever clears a folder
another one is writing into. A rank that dies loses only the chunk it was computing: the same
command resumes from the chunks on disk, with any number of processes.

``NICE_KIT_DIST_TIMEOUT`` (minutes, default 120) bounds how long a process waits for the others
(rank 0 merging a large stage or scoring rewards with a slow metric counts as waiting).
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch

T = TypeVar("T")

_ENV = ("RANK", "WORLD_SIZE")


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate, srun + torchrun) started this process."""
    return all(k in os.environ for k in _ENV)


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 without a launcher)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Dist:
    """This process's place among the processes running one command.

    ``backend`` is None for a single process without a launcher (:data:`SINGLE`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    cuda: bool = False  # each process runs on cuda:local_rank
    _solo: int = field(default=0, repr=False)  # > 0 while rank 0 works alone inside on_main

    @property
    def parallel(self) -> bool:
        """Whether collectives run: a process group exists and rank 0 is not working alone."""
        return self.backend is not None and self._solo == 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, configured: str | None) -> str | None:
        """The device this process runs on: ``cuda:LOCAL_RANK`` under a launcher on a GPU machine
        (a configured ``"cuda"`` or ``"cuda:N"`` included), else ``configured`` unchanged."""
        if self.backend is None or not self.cuda:
            return configured
        if configured is None or str(configured).startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return configured

    def cpu_threads(self, configured: int | str) -> int | str:
        """Torch threads: the configured count; with ``"auto"`` under a launcher, this machine's cores
        shared evenly by its processes (cores // LOCAL_WORLD_SIZE, at least 1) instead of measured."""
        if configured != "auto" or self.backend is None:
            return configured
        return max(1, available_cores() // max(1, self.local_world_size))

    def shard(self, shard: tuple[int, int] = (0, 1)) -> tuple[int, int]:
        """The chunks this rank computes: shard ``i`` of ``n`` (``--shard``) split again by rank."""
        if not self.parallel:
            return shard
        i, n = shard
        return i + n * self.rank, n * self.world_size

    # ------------------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.parallel:
            import torch.distributed as dist

            if self.cuda:
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def _broadcast_object(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        # through gloo where the group has it (no GPU synchronisation), else through the GPU
        on_gpu = self.cuda and "gloo" not in str(self.backend)
        dist.broadcast_object_list(box, src=0, device=torch.device("cuda", self.local_rank) if on_gpu else torch.device("cpu"))
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 alone while the others wait; every rank returns rank 0's result.

        Inside ``fn`` rank 0 works as a single process (no collectives), so stages it calls do all
        their chunks themselves. An error on rank 0 is raised on every rank."""
        if not self.parallel:
            return fn()
        status, error = None, None
        if self.is_main:
            self._solo += 1
            try:
                status = ("", fn())
            except BaseException as err:  # re-raised below, after telling the others
                error = err
                status = (f"{type(err).__name__}: {err}", None)
            finally:
                self._solo -= 1
        status = self._broadcast_object(status)
        if error is not None:
            raise error
        message, result = status
        if message:
            raise RuntimeError(f"rank 0 failed: {message}")
        return result

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the body on rank 0 first and on the others once it finished (opening a stage folder:
        only rank 0 ever clears a stale one). An error on rank 0 is raised on every rank."""
        if not self.parallel:
            yield
            return
        if not self.is_main:
            message = self._broadcast_object(None)
            if message:
                raise RuntimeError(f"rank 0 failed: {message}")
            yield
            return
        try:
            yield
        except BaseException as err:
            self._broadcast_object(f"{type(err).__name__}: {err}")
            raise
        self._broadcast_object("")

    def wait_visible(self, *paths: Path, timeout: float = 600.0) -> None:
        """On ranks other than 0: wait until files rank 0 has just written show here (a shared file
        system may show another machine's new file only after a moment). Does nothing on rank 0."""
        if self.is_main or self.backend is None:
            return
        deadline = time.monotonic() + timeout
        for path in map(Path, paths):
            while True:
                try:
                    os.listdir(path.parent)  # opening the folder makes an NFS client revalidate it
                except FileNotFoundError:
                    pass
                if path.exists():
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{path}: written by rank 0 but not visible to rank {self.rank} after "
                                       f"{timeout:.0f} s; the run directory must be on a file system every "
                                       "machine shares")
                time.sleep(0.2)

    def check_shared(self, folder: Path) -> None:
        """Fail early, on every rank, when ``folder`` is not one folder that every process sees."""
        if not self.parallel:
            return
        folder = Path(folder)

        def write_token() -> str:
            name = f".shared_check.{uuid.uuid4().hex}"
            (folder / name).write_text("")
            return name

        token = folder / self.on_main(write_token)
        self.wait_visible(token, timeout=120.0)
        self.barrier()
        self.on_main(lambda: token.unlink(missing_ok=True))

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` (on one device) over every process, in place; summed in float32 or wider."""
        if not self.parallel or not tensors:
            return
        import torch.distributed as dist

        dtype = torch.promote_types(tensors[0].dtype, torch.float32)
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's ``tensors`` into every process's, in place."""
        if not self.parallel or not tensors:
            return
        import torch.distributed as dist

        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


SINGLE = Dist()  # one process, no launcher


def init_from_env(device: str | None = None) -> Dist:
    """Join the launcher's process group (once per process); :data:`SINGLE` without a launcher.

    ``device`` is the configured device: a CPU device (or no GPU) gives gloo, else NCCL for CUDA
    tensors and gloo for CPU ones, and each process uses ``cuda:LOCAL_RANK``."""
    if not launched():
        return SINGLE
    import torch.distributed as dist

    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    cuda = torch.cuda.is_available() and not (device is not None and not str(device).startswith("cuda"))
    if cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                           "start at most that many processes per node (--nproc-per-node)")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        minutes = float(env.get("NICE_KIT_DIST_TIMEOUT", "120"))
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timedelta(minutes=minutes))
    elif dist.get_rank() != rank or dist.get_world_size() != world:
        raise RuntimeError("a torch.distributed process group exists with another rank or size than RANK/WORLD_SIZE")
    return Dist(rank, world, local_rank, local_world, dist.get_backend(), cuda)


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_rank_zero(method: Callable[..., T]) -> Callable[..., T]:
    """Decorate a method of an object with a ``dist`` attribute: rank 0 runs it, the other ranks
    wait and return its result (see :meth:`Dist.on_main`)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return self.dist.on_main(lambda: method(self, *args, **kwargs))

    return wrapper


__all__ = ["Dist", "SINGLE", "available_cores", "env_rank", "init_from_env", "launched", "on_rank_zero", "shutdown"]
