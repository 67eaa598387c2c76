"""Out of memory: the one rule every stage uses to tell it apart from other errors, and the clean-up after one.

A stage that runs batches (rollouts: :func:`nice_kit.rollouts.sample_rollouts`; gradients:
:class:`nice_kit.gradients.BatchSize`) catches an error, asks :func:`is_out_of_memory`, and if so
calls :func:`free_cached_memory`, halves its batch and retries; any other error propagates.

The rule is ours rather than accelerate's ``should_reduce_batch_size``, which looks only at a
``RuntimeError`` with exactly one argument and a few exact phrases: it misses a
``torch.OutOfMemoryError`` whose message lacks " out of memory." (as a test double's or a custom
allocator's may), the CPU allocator's wording on Windows ("not enough memory") and messages built
from several arguments, and it counts cuDNN's ``CUDNN_STATUS_NOT_SUPPORTED``, which is not a lack
of memory (halving would hide a real error). Every other message accelerate's rule accepts (CUDA,
HIP, XPU, MPS, HPU, CPU) is accepted here too (tests/test_memory.py). This module imports only torch and
the standard library, so any part of nice_kit may use it.
"""

from __future__ import annotations

import gc

import torch

# lower-cased phrases of allocator failures carried by a plain RuntimeError
OUT_OF_MEMORY_PHRASES = (
    "out of memory",            # CUDA / HIP / XPU ("CUDA out of memory. Tried to allocate ..."), MPS, c10
    "can't allocate memory",    # the CPU allocator on Linux / macOS ("DefaultCPUAllocator: can't allocate memory")
    "cannot allocate memory",   # errno 12 (ENOMEM) in an allocator's message
    "not enough memory",        # the CPU allocator on Windows ("DefaultCPUAllocator: not enough memory")
    "pt_devmem allocation failed",  # Habana HPU ("MODULE:PT_DEVMEM Allocation failed")
)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says a device (GPU, MPS, CPU) ran out of memory: a ``torch.OutOfMemoryError``,
    or a ``RuntimeError`` whose message holds one of :data:`OUT_OF_MEMORY_PHRASES` (any case)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    if not isinstance(err, RuntimeError):
        return False
    message = str(err).lower()
    return any(phrase in message for phrase in OUT_OF_MEMORY_PHRASES)


def free_cached_memory(device: torch.device | str | None = None) -> None:
    """After an out-of-memory error: collect garbage and return the allocator's cached blocks of
    ``device`` (CUDA or MPS; every initialised one when ``None``) to the device. Call it outside the
    ``except`` block, where the failed batch's tensors are no longer referenced by the traceback."""
    gc.collect()
    kind = torch.device(device).type if device is not None else None
    if kind in (None, "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if kind in (None, "mps") and torch.backends.mps.is_available():
        torch.mps.empty_cache()
