"""Page-locked host pools of exactly the bytes asked for.

`torch.empty(..., pin_memory=True)` goes through torch's CUDA CachingHostAllocator, which
rounds every block up to the next power of two: a 38 GB pool pins 64 GB, and a 1.23 GB
weight pool pins 2 GB. For a model whose weights and KV cache all live in host memory that
rounding decides the batch that fits. So a pool here is a plain CPU tensor whose bytes are
page-locked in place with cudaHostRegister, and unregistered when its memory is released:
when the last tensor over it (the pool or any view of it) goes, not when the pool object
does, since a view that outlives the pool still copies from it.

A registered block has none of the caching allocator's per-copy events, so nothing else
would stop it being freed while an asynchronous copy still reads or writes it: the release
synchronises the device first. The owners (OffloadedCache.close) synchronise their own
streams before they let go; this is the backstop for a pool dropped without that.

On a machine without CUDA (and in the CPU tests) a pool is just torch.empty.
"""
from __future__ import annotations

import os
import warnings
import weakref

import torch

from kvc.errors import KvcError

# cudaHostRegisterPortable: pinned for every CUDA context, not only the current device's, so
# a pool allocated while another device is current still copies to its own device by DMA
_PORTABLE = 1


def _register(ptr: int, nbytes: int) -> int:
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _PORTABLE))


def _unregister(ptr: int) -> int:
    return int(torch.cuda.cudart().cudaHostUnregister(ptr))


def _synchronize(device: torch.device) -> None:
    torch.cuda.synchronize(device)


def _release(ptr: int, nbytes: int, device: torch.device) -> None:
    """Runs as the pool's memory is released (a weakref callback: it must not raise)."""
    try:
        _synchronize(device)
        rc = _unregister(ptr)
    except Exception as e:  # noqa: BLE001 - a callback cannot raise; say what happened
        warnings.warn(f"kvc: unpinning a {nbytes / 1e9:.2f} GB host pool failed: {e}",
                      RuntimeWarning, stacklevel=1)
        return
    if rc != 0:
        warnings.warn(f"kvc: cudaHostUnregister of a {nbytes / 1e9:.2f} GB host pool returned "
                      f"CUDA error {rc}", RuntimeWarning, stacklevel=1)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised CPU tensor that copies to and from `device` by DMA: page-locked, exactly
    its own bytes, when `device` is a CUDA device; a plain CPU tensor otherwise."""
    t = torch.empty(shape, dtype=dtype)
    device = torch.device(device)
    nbytes = t.untyped_storage().nbytes()
    if device.type != "cuda" or nbytes == 0:
        return t
    ptr = t.untyped_storage().data_ptr()
    rc = _register(ptr, nbytes)
    if rc != 0:
        raise KvcError(f"pinning a {nbytes / 1e9:.2f} GB host pool failed (cudaHostRegister: "
                       f"CUDA error {rc}); lower the batch size or the context")
    # the storage object lives exactly as long as the memory (torch keeps one Python object
    # per storage while any tensor uses it), so its finalizer runs before the memory is freed
    fin = weakref.finalize(t.untyped_storage(), _release, ptr, nbytes, device)
    fin.atexit = False  # at exit the process and its registrations go together
    return t


def check_host_memory(nbytes: int) -> None:
    """Refuse pools larger than the machine's memory before pinning any of it (pinning too
    much can stall the whole host, not just this process)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > 0.9 * total:
        raise KvcError(f"the CPU pools need {nbytes / 1e9:.1f} GB, more than 90% of this machine's "
                       f"{total / 1e9:.1f} GB; lower the batch size or the context")

