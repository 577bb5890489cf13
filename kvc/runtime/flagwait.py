"""Signals between the GPU's streams and a host thread that make neither wait on the other
through CUDA: int32 flags in pinned host memory that only grow.

- `wait(i, v, stream)`: `stream`'s later work waits until flag i >= v (a one-thread kernel
  polls it); the host thread that queued it goes on at once.
- `signal(i, v, stream)`: once `stream`'s earlier work is done, flag i becomes v (a
  one-thread kernel writes it); `await_(i, v)` in a host thread sleeps until it has.
- `post(i, v)`: a host thread sets flag i.

The CPU attention lane (kvc.runtime.cpu_attention) hands each unit's query to its worker and
the partial back through these: the worker never calls CUDA, and the host thread never
blocks for the CPU's part.

Why the worker must never call CUDA while a poll may be waiting for it (the stall of session
11: OPT-6.7B on the H200 froze with no error): under lazy module loading (CUDA's default
since 12.2) the first launch of a kernel not yet loaded loads its module under the context's
lock and waits, holding it, for the GPU's queued work to drain; a poll in that work waits for
the worker; a worker blocked on that lock in any CUDA call (an event's synchronize, an event
freed) never posts. NVIDIA documents the hazard for kernels that wait on other work (CUDA
Programming Guide, "Lazy Loading": concurrent execution), and meta-pytorch/torchcomms#2334,
NVIDIA/nvbench#136 and uccl#220 hit it. With a CUDA-free worker a module load only waits for
the CPU's part in flight (milliseconds).

Why a kernel and not a host function (cuLaunchHostFunc, session 10's first try): CUDA does
not let device work added to ANY stream after a pending host function start before it has
run, so a host function that waits for the CPU holds back the GPU's other work (and hung at
OPT-6.7B on the H200, 2026-11-29; docs/BENCHMARKS.md). The poll is ordinary device work on
one stream: the copies and other streams' kernels go on beside it, and it holds one thread
of one SM while it waits.

Both waits are bounded (TIMEOUT_S): a poll that times out lets its stream go on and records
which flag it waited for (`timed_out`; the lane raises it as an error), a host wait raises.
A stall of the lane is then an error naming it, never a frozen process.

Pinned memory allocated by CUDA (torch's pin_memory) has the same address on the device as
on the host (unified addressing), so the kernels read and write the flags through their host
pointers. They are compiled at first use by NVRTC (torch.cuda._compile_kernel, which loads
the module at once, before any poll can wait); where that is missing, `available()` says so
and the lane waits on the host as before.
"""
from __future__ import annotations

import functools
import time

import torch

from kvc.errors import KvcError

# the longest a poll or a host wait lasts: a CPU part takes milliseconds
TIMEOUT_S = 60.0

# (the launcher passes Python ints as C ints: every scalar argument is an int)
_SRC = r"""
__device__ unsigned long long kvc_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

extern "C" __global__ void kvc_wait_flag(const volatile int* flags, int slot, int want,
                                         volatile int* report, int timeout_us) {
    unsigned long long start = kvc_now();
    int seen;
    while ((seen = flags[slot]) < want) {
        if (kvc_now() - start > 1000ull * (unsigned long long)timeout_us) {
            report[1] = slot;  // plain stores: atomics on host memory over PCIe are not assured
            report[2] = want;
            report[3] = seen;
            __threadfence_system();
            report[0] = 1;
            __threadfence_system();
            return;
        }
        __nanosleep(1000);
    }
}

extern "C" __global__ void kvc_set_flag(volatile int* flag, int value) {
    __threadfence_system();  // the stream's earlier work is done; its writes are visible
    *flag = value;
    __threadfence_system();
}

extern "C" __global__ void kvc_read_flag(const volatile int* flag, int* out) {
    *out = *flag;
}
"""


@functools.cache
def _kernels(device: int):
    """The kernels, loaded into `device`'s context (a function handle serves one device)."""
    with torch.cuda.device(device):
        return {name: torch.cuda._compile_kernel(_SRC, name)
                for name in ("kvc_wait_flag", "kvc_set_flag", "kvc_read_flag")}


@functools.cache
def available(device: int | None = None) -> bool:
    """Whether this torch and GPU (`device`: an index, None: the current one) can compile the
    kernels and the device reads, through its host pointer, what a host thread wrote to pinned
    memory and the reverse (checked once, with kernels that return at once: a check that
    cannot hang)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    device = torch.cuda.current_device() if device is None else device
    try:
        with torch.cuda.device(device):
            k = _kernels(device)
            probe = FlagWait(2, device)
            seen = torch.zeros(1, dtype=torch.int32, device=f"cuda:{device}")
            probe.post(0, 12345)
            stream = torch.cuda.current_stream(device)
            k["kvc_read_flag"](grid=(1, 1, 1), block=(1, 1, 1), args=[probe.flags[0:1], seen], stream=stream)
            probe.signal(1, 678, stream)
            stream.synchronize()
            return int(seen.item()) == 12345 and probe.value(1) == 678
    except Exception:  # noqa: BLE001 - no NVRTC, another API: the lane waits on the host
        return False


class FlagWait:
    """Int32 flags in pinned memory, all 0 at first; values only grow (each slot counts its
    own signals), so a wait for v is met by v or anything later. One writer per slot: a host
    thread (`post`) or one stream (`signal`, in the stream's order)."""

    def __init__(self, slots: int, device: int | None = None):
        self.device = torch.cuda.current_device() if device is None else device
        self.flags = torch.zeros(slots, dtype=torch.int32, pin_memory=True)
        self._host = self.flags.numpy()  # plain loads and stores from host threads
        # a timed-out poll's record: [given up, its slot, the value it wanted, the last seen]
        self.report = torch.zeros(4, dtype=torch.int32, pin_memory=True)
        self._report = self.report.numpy()

    def value(self, slot: int) -> int:
        return int(self._host[slot])

    def post(self, slot: int, value: int) -> None:
        """Publish `value` from a host thread (after the data it guards was written: x86 and
        the PCIe reads the GPU makes keep the stores' order)."""
        self._host[slot] = value

    def wait(self, slot: int, value: int, stream) -> None:
        """`stream`'s later work waits until the flag is >= value (TIMEOUT_S at most)."""
        _kernels(self.device)["kvc_wait_flag"](grid=(1, 1, 1), block=(1, 1, 1), stream=stream, args=[
            self.flags, int(slot), int(value), self.report, int(TIMEOUT_S * 1e6)])

    def signal(self, slot: int, value: int, stream) -> None:
        """Once `stream`'s work queued so far is done, the flag becomes `value`."""
        _kernels(self.device)["kvc_set_flag"](grid=(1, 1, 1), block=(1, 1, 1), stream=stream,
                                   args=[self.flags[slot:slot + 1], int(value)])

    def await_(self, slot: int, value: int, what: str = "the GPU") -> None:
        """Sleep (no CUDA call) until the flag is >= value; a KvcError after TIMEOUT_S."""
        if self._host[slot] >= value:
            return
        deadline = time.monotonic() + TIMEOUT_S
        pause = 2e-6
        while self._host[slot] < value:
            if time.monotonic() > deadline:
                raise KvcError(f"waited {TIMEOUT_S:.0f} s for {what} (flag {slot} at "
                               f"{self._host[slot]}, expected {value}): the CPU attention lane stalled")
            time.sleep(pause)
            pause = min(pause * 2, 5e-5)

    def timed_out(self, clear: bool = False) -> str | None:
        """None, or what a poll that gave up waited for (its stream went on); `clear`: forget
        it once said (the next gives up anew)."""
        if not self._report[0]:
            return None
        slot, want, seen = (int(x) for x in self._report[1:])
        if clear:
            self._report[0] = 0
        return f"a GPU stream waited {TIMEOUT_S:.0f} s for flag {slot} to reach {want} (it was {seen})"
