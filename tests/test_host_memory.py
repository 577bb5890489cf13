"""Host memory (issue 6): pools page-locked to their exact size, and K,V pools that keep only the
rows the plan reads back as K,V.

CPU only. The CUDA calls of kvc.runtime.pinned are replaced by a recorder here, so everything
but the real cudaHostRegister runs; tests/test_gpu.py pins for real.
"""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from kvc.errors import KvcError
from kvc.runtime import pinned

CONF = Path(__file__).resolve().parents[1] / "conf" / "hardware"
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


# --- pinned_empty ------------------------------------------------------------------------------

class FakeCuda:
    """Stands in for cudaHostRegister / cudaHostUnregister / synchronize, and records them."""

    def __init__(self, monkeypatch, register_rc=0, unregister_rc=0):
        self.calls = []
        self.register_rc, self.unregister_rc = register_rc, unregister_rc
        monkeypatch.setattr(pinned, "_register", self._register)
        monkeypatch.setattr(pinned, "_unregister", self._unregister)
        monkeypatch.setattr(pinned, "_synchronize", lambda d: self.calls.append(("sync", str(d))))

    def _register(self, ptr, n):
        self.calls.append(("register", ptr, n))
        return self.register_rc

    def _unregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return self.unregister_rc


def test_pinned_empty_registers_exactly_its_bytes(monkeypatch):
    fake = FakeCuda(monkeypatch)
    t = pinned.pinned_empty((3, 5, 7), torch.float16, torch.device("cuda:0"))
    ptr = t.data_ptr()
    assert t.device.type == "cpu" and t.shape == (3, 5, 7)
    assert fake.calls == [("register", ptr, 3 * 5 * 7 * 2)]  # 210 bytes, not 256
    view = t[1:]
    del t
    gc.collect()
    assert len(fake.calls) == 1  # a view still uses the memory: still registered
    view.fill_(1.0)
    del view
    gc.collect()
    # the device finishes its copies, then the block is unregistered, once
    assert fake.calls[1:] == [("sync", "cuda:0"), ("unregister", ptr)]


def test_pinned_empty_without_cuda_is_plain(monkeypatch):
    fake = FakeCuda(monkeypatch)
    t = pinned.pinned_empty((4, 2), torch.float32, torch.device("cpu"))
    e = pinned.pinned_empty((0, 2), torch.float32, torch.device("cuda"))
    del t, e
    gc.collect()
    assert fake.calls == []


def test_pinned_empty_failure_is_one_line(monkeypatch):
    FakeCuda(monkeypatch, register_rc=2)
    with pytest.raises(KvcError, match=r"pinning a 0\.00 GB host pool failed \(cudaHostRegister: CUDA error 2\)"):
        pinned.pinned_empty((1000,), torch.float32, torch.device("cuda"))


def test_unpin_failure_warns(monkeypatch):
    FakeCuda(monkeypatch, unregister_rc=1)
    held = [pinned.pinned_empty((1000,), torch.float32, torch.device("cuda"))]
    with pytest.warns(RuntimeWarning, match="cudaHostUnregister .* returned CUDA error 1"):
        held.clear()  # the last tensor over the memory goes: its finalizer runs
