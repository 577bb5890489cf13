"""The CPU attention lane's figures (issue 17): `hardware.cpu_attn_gbps` and
`cpu_attn_fixed_us`, measured the way the lane runs.

- Rate: kvc.runtime.cpu_attention.partial_attention over a layer's head-major K,V copy (what
  the lane reads) at three contexts, with `threads` intra-op threads, while a pinned host-to-GPU
  copy loop runs beside it: in a decode step the link copies the rest of the cache at the same
  time, from the same host memory (on the H200's host, one llama-3-8b b32 layer timed again
  and again, warm in its 300 MB L3: 60 GB/s alone, 50 beside the copies; 16 threads beside
  the copies fall to 22: the thread copying and the host thread need their cores). Each call
  reads K,V it has not read for a while (a ring of copies larger than any last-level cache),
  as the lane does: a step reads every layer's rows once. Inside the steps the kernel read
  less still, 25-40 GB/s (docs/BENCHMARKS.md, sessions 12-14): the runtime's guard keeps
  the lane only while the steps are faster with it (kvc.runtime.lane_guard). Fitted time =
  fixed + K,V bytes / rate over the contexts (kvc.profiler.fit: noise that tilts the fit
  cannot give a rate the kernel never showed).
- Fixed part: one unit's whole hand-off through kvc.runtime.cpu_attention.CpuLane for a few
  rows (query down, the worker, the partial up), median wall time, plus the kernel's fixed
  part from the fit.
Only on a GPU: on a CPU device there is no second lane (the "device" is the CPU itself).
"""
from __future__ import annotations

import itertools
import statistics
import threading
import time

import torch

from kvc.hardware import default_cpu_attn_threads
from kvc.profiler.fit import fit_affine
from kvc.runtime.cpu_attention import CpuLane, partial_attention

GB = 1e9
# a llama-3-8b layer at batch 32 (GQA 32/8): the shape the lane serves most
SHAPE = {"b": 32, "kv": 8, "heads": 32, "hd": 128}
CONTEXTS = (512, 1024, 2048)
# the K,V a context's ring holds in all: past the last-level cache of any host kvc runs on
RING_BYTES = 1 << 29


class CopyLoop:
    """Pinned host -> GPU copies in a thread, for as long as the block runs; `gbps` after it:
    the rate they kept."""

    def __init__(self, device: torch.device, nbytes: int = 1 << 28):
        self.src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.stream = torch.cuda.Stream(device)
        self.stop = threading.Event()
        self.bytes, self.gbps = 0, 0.0

    def _run(self):
        with torch.cuda.stream(self.stream):
            while not self.stop.is_set():
                self.dst.copy_(self.src, non_blocking=True)
                self.stream.synchronize()
                self.bytes += self.src.nbytes

    def __enter__(self):
        self.stop.clear()
        self.bytes, self.t0 = 0, time.perf_counter()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.gbps = self.bytes / (time.perf_counter() - self.t0) / GB


def median_s(fn, reps: int, warm: int = 1) -> float:
    """Median wall seconds of `fn` over `reps` calls after `warm` unmeasured ones."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_attention(device: torch.device, dtype: torch.dtype, threads: int = 0, reps: int = 7,
                  contexts=CONTEXTS) -> dict[str, float]:
    """{cpu_attn_gbps, cpu_attn_fixed_us, cpu_attn_threads} of this host beside `device`'s link."""
    threads = threads or default_cpu_attn_threads()
    b, kv, heads, hd = SHAPE["b"], SHAPE["kv"], SHAPE["heads"], SHAPE["hd"]
    q = torch.randn(b, heads, hd).to(dtype)
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        nbytes, times = [], []
        with CopyLoop(device):
            for s in contexts:
                times.append(kernel_s(q, (b, kv, s, hd), dtype, reps))
                nbytes.append(2 * b * kv * s * hd * q.element_size())
        fixed, per_byte = fit_affine(nbytes, times)
        hand_off = _hand_off_s(device, dtype, threads, reps)
    finally:
        torch.set_num_threads(was)
    return {"cpu_attn_gbps": 1 / per_byte / GB, "cpu_attn_fixed_us": (fixed + hand_off) * 1e6,
            "cpu_attn_threads": threads}


def kernel_s(q: torch.Tensor, shape, dtype: torch.dtype, reps: int) -> float:
    """The lane's kernel over a head-major K,V of `shape` [b, kv, s, hd]: median seconds, each
    call over the next K,V of a ring larger than the caches (RING_BYTES)."""
    k = torch.randn(shape).to(dtype)
    copies = min(256, max(2, -(-RING_BYTES // (2 * k.nbytes))))  # a smoke run's tiny K,V: 256
    ring = [(k, k.clone())] + [(k.clone(), k.clone()) for _ in range(copies - 1)]
    turn = itertools.cycle(ring)

    def once():
        partial_attention(q, *next(turn), shape[-1] ** -0.5)
    return median_s(once, reps, warm=len(ring))


def _hand_off_s(device: torch.device, dtype: torch.dtype, threads: int, reps: int) -> float:
    """One unit's query down, worker, partial up, for 16 rows: the wall time past the kernel."""
    b, kv, heads, hd = SHAPE["b"], SHAPE["kv"], SHAPE["heads"], SHAPE["hd"]
    rows = 16
    pool = torch.randn(rows, b, kv, hd).to(dtype)
    q = torch.randn(b, heads, hd, device=device).to(dtype)
    lane = CpuLane(device, 1, threads)
    try:
        lane.prepare(0, pool, pool, rows)

        def once():
            lane.begin(0, q, pool, pool, 0, rows, hd ** -0.5, 0.0, None)
            out, _ = lane.end(0)
            torch.cuda.current_stream(device).synchronize()
            return out
        with torch.inference_mode():
            total = median_s(once, reps)
            kernel = median_s(lambda: partial_attention(q.cpu(), pool.permute(1, 2, 0, 3),
                                                         pool.permute(1, 2, 0, 3), hd ** -0.5), reps)
    finally:
        lane.close()
    return max(0.0, total - kernel)
