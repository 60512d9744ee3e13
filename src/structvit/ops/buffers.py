"""Reuse of the fused kernel's large CPU buffers between calls.

PyTorch's CPU allocator returns large blocks to the system (glibc maps every block over
32 MiB with mmap), so a buffer allocated anew on every call is page-faulted and zeroed by
the kernel anew: for the folded map At that the fused backend keeps for backward (B*h*N^2
elements) plus its chunk buffers, a noticeable part of a forward + backward at video sizes.
:class:`BufferCache` keeps freed buffers and hands them out again, like the CUDA
caching allocator does on GPUs.

A buffer is handed out as a view of a base tensor that the cache holds; it is free again
when no view of it is alive any more (the storage's use count is back to the base's own),
e.g. when autograd has released a tensor saved for backward after the backward ran. So a
graph kept alive with ``retain_graph=True`` keeps its buffers, and nothing is reused while
anything can still read it.

``structvit.config.set_buffer_cache_mb`` (``STRUCTVIT_BUFFER_CACHE_MB``) bounds the bytes the
cache holds (default 1024; 0 turns it off); :func:`empty_cache` releases the free ones.
"""
from __future__ import annotations

import threading

import torch

from .. import config


def _storage_use_count(t: torch.Tensor) -> int | None:
    """References to the storage of ``t`` (None where this PyTorch cannot tell)."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    if counter is None:
        return None
    return counter(t.untyped_storage()._cdata)


def cache_limit_bytes() -> int:
    """The byte bound from the settings (``STRUCTVIT_BUFFER_CACHE_MB``)."""
    return config.settings().buffer_cache_bytes


class BufferCache:
    """Large 1-D CPU buffers, handed out as views and reused once no view is alive.

    ``max_bytes=None`` reads the bound from ``structvit.config`` at every :meth:`take` (so it
    can be changed while running). Thread-safe.
    """

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self._entries: list[tuple[torch.Tensor, int]] = []  # (base, its storage use count when free)
        self._lock = threading.Lock()

    def _limit(self) -> int:
        return cache_limit_bytes() if self.max_bytes is None else self.max_bytes

    @staticmethod
    def _free(entry: tuple[torch.Tensor, int]) -> bool:
        return _storage_use_count(entry[0]) == entry[1]

    @property
    def cached_bytes(self) -> int:
        return sum(base.numel() * base.element_size() for base, _ in self._entries)

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements (uninitialised), a cached one when one is free."""
        limit = self._limit()
        with self._lock:
            for i, entry in enumerate(self._entries):
                base = entry[0]
                if base.dtype == dtype and base.numel() == numel and self._free(entry):
                    # move to the end: eviction below takes the least recently used first
                    self._entries.append(self._entries.pop(i))
                    return base.view(-1)
            base = torch.empty(numel, dtype=dtype)
            size = numel * base.element_size()
            count = _storage_use_count(base)
            if count is None or size > limit:
                return base
            while self._entries and self.cached_bytes + size > limit:
                victim = next((i for i, e in enumerate(self._entries) if self._free(e)), None)
                if victim is None:
                    return base  # everything cached is in use: do not cache this one
                del self._entries[victim]
            self._entries.append((base, count))
            return base.view(-1)

    def clear(self) -> None:
        """Drop the free buffers (those in use are dropped from the cache and freed when
        their last view goes)."""
        with self._lock:
            self._entries.clear()


# The fused backend's cache (one per process, like PyTorch's caching allocators).
CPU_BUFFERS = BufferCache()


def empty_cache() -> None:
    """Release the fused kernel's cached CPU buffers (see ``STRUCTVIT_BUFFER_CACHE_MB``)."""
    CPU_BUFFERS.clear()
