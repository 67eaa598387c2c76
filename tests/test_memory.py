"""The one out-of-memory rule (nice_kit.memory): which errors it recognises, what it frees after one.

``OUT_OF_MEMORY_ERRORS`` are the errors the stages' tests inject (tests/test_rollouts.py,
tests/test_gradients.py): one of each kind a device raises."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

import nice_kit.memory as memory_mod
from nice_kit.memory import free_cached_memory, is_out_of_memory

# one error of each kind, as torch raises them (messages copied from torch 2.x and its allocators)
OUT_OF_MEMORY_ERRORS: dict[str, Callable[[], BaseException]] = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                           "capacity of 139.81 GiB of which 1.12 GiB is free."),
    "mps": lambda: RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.00 GB, "
                                "max allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool."),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                "memory: you tried to allocate 137438953472 bytes. Error code 12 (Cannot allocate "
                                "memory)"),
}

MORE_OUT_OF_MEMORY = [
    torch.OutOfMemoryError("fake: more than 4 rows"),  # the type alone decides, whatever the message
    RuntimeError("HIP out of memory. Tried to allocate 20.00 MiB"),
    RuntimeError("XPU out of memory. Tried to allocate 1.00 GiB"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("[enforce fail at C:\\actions-runner\\alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough "
                 "memory: you tried to allocate 4294967296 bytes."),
    RuntimeError("C10 Out of Memory. Trying to allocate 1024 bytes"),
    RuntimeError("FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory", "with a second argument"),
]

NOT_OUT_OF_MEMORY = [
    RuntimeError("shape mismatch: value tensor of shape [4] cannot be broadcast to indexing result of shape [3]"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous "
                 "input."),
    RuntimeError("Expected all tensors to be on the same device"),
    RuntimeError(),
    ValueError("out of memory"),  # the words alone do not make an allocator's error
    KeyError("can't allocate memory"),
    TypeError("unsupported operand"),
]


@pytest.mark.parametrize("kind", sorted(OUT_OF_MEMORY_ERRORS))
def test_each_device_kind_of_out_of_memory_is_recognised(kind):
    assert is_out_of_memory(OUT_OF_MEMORY_ERRORS[kind]())


@pytest.mark.parametrize("err", MORE_OUT_OF_MEMORY, ids=lambda e: str(e)[:30])
def test_other_backends_messages_are_recognised(err):
    assert is_out_of_memory(err)


@pytest.mark.parametrize("err", NOT_OUT_OF_MEMORY, ids=lambda e: f"{type(e).__name__}:{str(e)[:30]}")
def test_other_errors_are_not_out_of_memory(err):
    assert not is_out_of_memory(err)


def test_a_real_cpu_allocation_failure_is_recognised():
    with pytest.raises(RuntimeError) as caught:
        torch.empty(2 ** 62, dtype=torch.uint8)  # 4 EiB: no allocator hands that out
    assert is_out_of_memory(caught.value)


def test_everything_accelerates_rule_accepts_but_cudnn_is_accepted():
    should_reduce = pytest.importorskip("accelerate.utils.memory").should_reduce_batch_size
    errors = [make() for make in OUT_OF_MEMORY_ERRORS.values()] + MORE_OUT_OF_MEMORY + NOT_OUT_OF_MEMORY
    theirs = [e for e in errors if should_reduce(e)]
    assert len(theirs) >= 4  # the comparison has teeth: accelerate accepts several of these
    assert [e for e in theirs if not is_out_of_memory(e)] == [NOT_OUT_OF_MEMORY[2]]  # only cuDNN's NOT_SUPPORTED
    assert [e for e in errors if is_out_of_memory(e) and not should_reduce(e)]  # and we accept more


def test_free_cached_memory_empties_the_named_device_only(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(memory_mod.gc, "collect", lambda: calls.append("gc") or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append("mps"))
    for device, want in (("cpu", ["gc"]), (torch.device("cuda", 0), ["gc", "cuda"]), ("mps", ["gc", "mps"]),
                         (None, ["gc", "cuda", "mps"])):
        calls.clear()
        free_cached_memory(device)
        assert calls == want, device
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # never initialises CUDA to empty it
    calls.clear()
    free_cached_memory("cuda")
    assert calls == ["gc"]


def test_free_cached_memory_runs_on_this_machine():
    free_cached_memory()
    free_cached_memory("cpu")
