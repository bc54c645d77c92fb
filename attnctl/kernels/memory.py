"""Thread counts, per-thread scratch buffers for the kernels' memory-bound CPU work, and handing
free heap memory back to the OS."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import sys
import threading
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the enclosed ops on n intra-op threads (process-wide; restored after).

    The gather path's copies are memory bound and its bookkeeping ops are tiny: on one thread they
    are as fast (index_select of 94 MB: 31 ms on 1 thread vs 46 ms on 2, 2-core CPU under load),
    and they skip the thread barrier that a busy shared CPU makes slow. SDPA keeps every thread.
    """
    saved = torch.get_num_threads()
    if n == saved:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class _Buffers(threading.local):
    def __init__(self) -> None:
        self.by_name: dict[tuple[str, torch.dtype], torch.Tensor] = {}


_BUFFERS = _Buffers()


def scratch(
    like: torch.Tensor, shape: tuple[int, ...], name: str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """An uninitialised tensor of `shape` on `like`'s device, for use within one call only.

    On CPU, a view of a buffer kept per thread and `name` and reused by later calls (each as large
    as the largest request so far): fresh large CPU allocations page-fault on first touch, which on
    the 2-core machine measured costs more than the copy into them (a 64 MB copy: 25 ms into fresh
    memory, up to 190 ms into never-touched memory, 10 ms into a reused buffer). Elsewhere, where
    caching allocators reuse memory anyway, a new tensor.
    """
    dtype = like.dtype if dtype is None else dtype
    if like.device.type != "cpu":
        return like.new_empty(shape, dtype=dtype)
    numel = math.prod(shape)
    buffer = _BUFFERS.by_name.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = _BUFFERS.by_name[(name, dtype)] = like.new_empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def take(src: torch.Tensor, dim: int, index: torch.Tensor, name: str) -> torch.Tensor:
    """src.index_select(dim, index) into `scratch` (a new tensor where autograd records the op)."""
    if torch.is_grad_enabled() and src.requires_grad:
        return src.index_select(dim, index)
    shape = src.shape[:dim] + index.shape + src.shape[dim + 1 :]
    return torch.index_select(src, dim, index, out=scratch(src, shape, name))


def release_free_memory() -> None:
    """Hand the C allocator's free heap memory back to the OS (glibc's `malloc_trim`; elsewhere
    nothing). Frees nothing that is in use; the next allocations fault their pages in again.

    PyTorch's CPU tensors of up to 32 MB come from glibc's heap once a larger one has been freed,
    and a gradient forward and backward, which keep some tensors while freeing others around them,
    leave freed heap that the process keeps resident: at FLUX's width and 1024 px, 0.85 GB of a
    latent update's 1.4 GB peak above the weights was such free memory.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own C library
    except OSError:
        return None
