"""Keep a process's resident memory close to what its tensors use (glibc's malloc on Linux).

PyTorch's CPU tensors come from ``malloc``. glibc serves large blocks with ``mmap`` (returned to the system
on ``free``) only above a threshold that it raises *dynamically* each time such a block is freed, up to
32 MB. Training frees and re-allocates activation tensors of a few MB every step, so after the first steps
they all come from the heap, whose freed space fragments and is not given back: measured on
SmolLM2-135M (one client-round, max-tokens-per-batch 1024), 5.6 GB peak resident memory with the default
and 3.1 GB with a fixed 1 MB threshold, at a similar speed (a fixed 64 KB threshold gave 2.6 GB but was
~40% slower: every activation then costs fresh page faults). ``mallopt`` with an explicit threshold also
turns the dynamic rule off (glibc manual, "Memory Allocation Tunables"; ``MALLOC_MMAP_THRESHOLD_``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # <malloc.h>


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None  # glibc only (not musl, macOS)


@functools.cache
def bound_allocator_cache(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve blocks of ``threshold`` bytes and more with ``mmap`` in this process (once; idempotent).
    Returns whether it took effect (False where the C library is not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    log.debug("malloc mmap threshold %d bytes: %s", threshold, ok)
    return ok


def release_free_memory() -> None:
    """Give freed heap memory back to the system (``malloc_trim``), e.g. after dropping a model."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
