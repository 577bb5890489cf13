"""A stream that waits for the host without the host waiting: a one-thread kernel that polls
a flag in pinned host memory until a host thread has written a value at least as large.

The CPU attention lane (kvc.runtime.cpu_attention) hands each unit's partial to the GPU
through one: the worker writes the partial into pinned memory, then the unit's flag; the
compute stream runs the poll before the partial's copy up, so the host thread issuing the
GPU's work never blocks for the CPU's part.

Why a kernel and not a host function (cuLaunchHostFunc, session 10's first try): CUDA does
not let device work added to ANY stream after a pending host function start before it has
run, so a host function that waits for the CPU holds back the GPU's other work (and hung at
OPT-6.7B on the H200, 2026-11-29; docs/BENCHMARKS.md). The poll is ordinary device work on
one stream: the copies and other streams' kernels go on beside it, and it holds one thread
of one SM while it waits.

Pinned memory allocated by CUDA (torch's pin_memory) has the same address on the device as
on the host (unified addressing), so the kernel reads the flag through its host pointer.
The kernel is compiled at first use by NVRTC (torch.cuda._compile_kernel); where that is
missing, `available()` says so and the lane waits on the host as before.
"""
from __future__ import annotations

import functools

import torch

_WAIT = r"""
extern "C" __global__ void kvc_wait_flag(const volatile int* flag, int want) {
    while (*flag < want) {
        __nanosleep(1000);
    }
}
"""
_READ = r"""
extern "C" __global__ void kvc_read_flag(const volatile int* flag, int* out) {
    *out = *flag;
}
"""


@functools.cache
def _kernel():
    return torch.cuda._compile_kernel(_WAIT, "kvc_wait_flag")


@functools.cache
def available() -> bool:
    """Whether this torch and GPU can compile the poll and the device reads, through its host
    pointer, what a host thread wrote to pinned memory (checked once with a kernel that reads
    the flag and returns: a check that cannot hang)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    try:
        _kernel()
        read = torch.cuda._compile_kernel(_READ, "kvc_read_flag")
        probe, seen = FlagWait(1), torch.zeros(1, dtype=torch.int32, device="cuda")
        probe.post(0, 12345)
        read(grid=(1, 1, 1), block=(1, 1, 1), args=[probe.flags, seen])
        return int(seen.item()) == 12345
    except Exception:  # noqa: BLE001 - no NVRTC, another API: the lane waits on the host
        return False


class FlagWait:
    """Per-slot int32 flags in pinned memory, all 0 at first. `post(i, v)` from any host
    thread; `wait(i, v, stream)` makes `stream`'s later work wait until flag i >= v, the host
    not at all. Values only grow: each slot counts its own posts."""

    def __init__(self, slots: int):
        self.flags = torch.zeros(slots, dtype=torch.int32, pin_memory=True)
        self._host = self.flags.numpy()  # plain stores from the posting thread

    def post(self, slot: int, value: int) -> None:
        """Publish `value` (after the data it guards was written: x86 and the PCIe reads the
        GPU makes keep the stores' order)."""
        self._host[slot] = value

    def wait(self, slot: int, value: int, stream) -> None:
        _kernel()(grid=(1, 1, 1), block=(1, 1, 1), args=[self.flags[slot:slot + 1], int(value)],
                  stream=stream)
