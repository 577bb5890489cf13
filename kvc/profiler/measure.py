"""Measure this machine into a HardwareConfig (kvc.profiler.resolve caches it per machine): link bandwidth and latency, GEMM rate against
rows, decode attention against context, and how copies and compute slow each other.

Every figure is a median over repeats after a warm-up, fitted to the affine forms cost.py
uses (time = fixed + size / rate), so a profile plugs straight into the cost model. On CUDA
times come from CUDA events on the stream that ran the work; on CPU the "device" is the CPU
itself, the "link" is a memcpy between two host buffers (what the runtime does there), and a
run takes well under 20 s so that plans made on a CPU are measured, not invented.
"""
from __future__ import annotations

import datetime
import platform
import re
import statistics
import subprocess
import threading
import time

import torch

from kvc import progress
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.profiler.cpu_lane import cpu_attention
from kvc.profiler.fit import fit_affine as _fit_affine
from kvc.profiler.host import host_us
from kvc.runtime.attention import backends

GB = 1e9
# the K/V projection shape of a 7B-class multi-head model: what recompute runs
CUDA_SHAPE = {"h": 4096, "hkv": 4096, "rows": [16, 64, 256, 1024, 4096, 16384], "reps": 10}
CPU_SHAPE = {"h": 1024, "hkv": 1024, "rows": [16, 64, 256, 1024, 2048], "reps": 7}
STEPS = ("H2D copies", "D2H copies", "both directions", "GEMM rate", "attention",
         "memory stream", "overlap", "kernel and host overhead", "all GPUs at once",
         "CPU attention")
# several GPUs (issue 18): each GPU's H2D copy of this many bytes, all GPUs at once (>= 256 MB:
# long enough that the host's shared limit, not the start of the copies, sets the time)
HOST_LINK_BYTES = 1 << 28
HOST_LINK_COPIES = 4  # copies per GPU per round (about 20-30 ms each round on a PCIe Gen5 host)



class _Stages:
    """The profile's steps on kvc.progress's bar (drawn on a terminal when `on`)."""

    def __init__(self, on: bool):
        with progress.enabled(on):
            self.bar = progress.bar("kvc profile", total=len(STEPS), unit="step")

    def step(self, what: str) -> None:
        self.bar.set_description(f"kvc profile ({what})")
        if self.bar.n < len(STEPS) and what != STEPS[0]:
            self.bar.update()

    def finish(self) -> None:
        self.bar.update()
        self.bar.close()


class _Timer:
    """Median seconds of fn(), after warm-up. CUDA: events on `stream`; CPU: perf_counter."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn, reps: int, warmup: int = 2, stream=None) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        for _ in range(reps):
            if self.cuda:
                st = stream or torch.cuda.current_stream()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(st)
                with torch.cuda.stream(st):
                    fn()
                b.record(st)
                b.synchronize()
                out.append(a.elapsed_time(b) * 1e-3)
            else:
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
        return statistics.median(out)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def profile(device: str, progress: bool = True, dtype: str | None = None) -> HardwareConfig:
    """Measure `device` ("cuda" or "cpu"). dtype defaults to float16 on CUDA, float32 on CPU
    (CPU half-precision GEMMs are far slower than the float32 a CPU run uses)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KvcError(f"cannot profile {device!r}: torch sees no CUDA device; use device cpu")
    if not (device.startswith("cuda") or device == "cpu"):
        raise KvcError(f"cannot profile {device!r}: expected cuda or cpu")
    cuda = device.startswith("cuda")
    dt = getattr(torch, dtype or ("float16" if cuda else "float32"))
    shape = CUDA_SHAPE if cuda else CPU_SHAPE
    dev = torch.device("cuda" if cuda else "cpu")
    timer = _Timer("cuda" if cuda else "cpu")
    stages = _Stages(progress)
    side = torch.cuda.Stream() if cuda else None
    pin = cuda  # pinned host memory: the only fast path for H2D (DESIGN.md)

    # CPU: past the caches, or the "link" looks like L2
    sizes = [2 ** k for k in (range(16, 29, 2) if cuda else range(18, 27, 2))]
    host = torch.empty(max(sizes), dtype=torch.uint8, pin_memory=pin)
    devb = torch.empty(max(sizes), dtype=torch.uint8, device=dev)
    reps = shape["reps"]

    def link(direction):
        ts = []
        for n in sizes:
            src, dst = (host[:n], devb[:n]) if direction == "h2d" else (devb[:n], host[:n])
            ts.append(timer(lambda: dst.copy_(src, non_blocking=True), reps, stream=side))
        return _fit_affine(sizes, ts)

    stages.step(STEPS[0])
    h2d_lat, h2d_b = link("h2d")
    stages.step(STEPS[1])
    d2h_lat, d2h_b = link("d2h")

    stages.step(STEPS[2])
    n = max(sizes) // 2
    host2 = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
    devb2 = torch.empty(n, dtype=torch.uint8, device=dev)
    bidir_s = _both_directions(cuda, timer, host[:n], devb[:n], devb2, host2, reps)
    bidir_gbps = min(n / bidir_s / GB, 1 / h2d_b / GB, 1 / d2h_b / GB)

    stages.step(STEPS[3])
    h, hkv = shape["h"], shape["hkv"]
    wkv = torch.randn(h, 2 * hkv, device=dev).to(dt)
    gts = []
    for rows in shape["rows"]:
        x = torch.randn(rows, h, device=dev).to(dt)
        gts.append(timer(lambda: x @ wkv, reps))
    g_fixed, g_per_row = _fit_affine(shape["rows"], gts)
    flops_per_row = 2 * h * 2 * hkv
    gemm_tflops = flops_per_row / g_per_row / 1e12
    half_rows = g_fixed / g_per_row

    stages.step(STEPS[4])
    attn_fixed, attn_per_byte, p = _attention(dev, dt, timer, reps, cuda)

    stages.step(STEPS[5])
    mem_gbps = _memory_stream(dev, dt, timer, reps, cuda)

    stages.step(STEPS[6])
    comp_slow, copy_slow = _overlap(cuda, dev, dt, timer, host, devb, side, h, hkv)

    stages.step(STEPS[7])
    launch_us = _queued_kernel_us(dev, timer, cuda)
    host = host_us(dev, dt)

    stages.step(STEPS[8])
    multi = _several_gpus(timer) if cuda else {}

    stages.step(STEPS[9])  # the CPU attention lane beside the link (a GPU's host only)
    lane = cpu_attention(dev, dt) if cuda else {}

    stages.finish()
    if cuda:
        props = torch.cuda.get_device_properties(dev)
        gpu_mem = props.total_memory / GB
    else:
        gpu_mem = _host_mem_gb() / 2  # on a CPU the model and the "offloaded" pools share RAM
    return HardwareConfig(
        name="profiled", device="cuda" if cuda else "cpu",
        h2d_gbps=_r(1 / h2d_b / GB), d2h_gbps=_r(1 / d2h_b / GB), bidir_gbps=_r(bidir_gbps),
        link_latency_us=_r((h2d_lat + d2h_lat) / 2 * 1e6),
        gemm_tflops=_r(gemm_tflops, 4), gemm_half_rows=_r(half_rows),
        attn_gbps=_r(1 / attn_per_byte / GB), attn_fixed_us=_r(attn_fixed * 1e6), mem_gbps=_r(mem_gbps),
        gpu_mem_gb=_r(gpu_mem), cpu_mem_gb=_r(_host_mem_gb() / (1 if cuda else 2)),
        mem_margin_gb=2.0 if cuda else 1.0,
        compute_slowdown=_r(comp_slow, 3), copy_slowdown=_r(copy_slow, 3), launch_us=_r(launch_us),
        **{k: _r(v) for k, v in host.items()}, **{k: _r(v) for k, v in multi.items()},
        **{k: v if isinstance(v, int) else _r(v) for k, v in lane.items()},
        measured={**machine_info(device), "dtype": str(dt).replace("torch.", ""),
                  "cuda_devices": torch.cuda.device_count() if cuda else 0,
                  "gemm_shape": f"[rows x {h}] @ [{h} x {2 * hkv}]",
                  "gemm_rows": shape["rows"], "gemm_ms": [_r(t * 1e3, 4) for t in gts]},
    )



def _several_gpus(timer) -> dict:
    """On a host with more than one CUDA device: host_link_gbps, the pinned H2D rate all GPUs
    reach together (`host_link_gbps`), and collective_gbps from a GPU-to-GPU copy (`_peer_gbps`).
    One GPU: nothing (the HardwareConfig defaults: host_link_gbps 0, no shared limit known;
    collective_us and collective_gbps as preset)."""
    n = torch.cuda.device_count()
    if n < 2:
        return {}
    return {"host_link_gbps": host_link_gbps(list(range(n))),
            "collective_gbps": _peer_gbps(timer)}


def host_link_gbps(devices: list[int], nbytes: int = HOST_LINK_BYTES,
                   copies: int = HOST_LINK_COPIES, rounds: int = 3) -> float:
    """The summed pinned host-to-device rate (GB/s) of `devices` all copying at once, as
    ranks of a batch split do: one thread per device, each issuing `copies` copies of
    `nbytes` from its own pinned buffer on its own device's stream; a round's rate is all the
    bytes over the wall time from the common start to the last device's end
    (`summed_gbps`); the median of `rounds` rounds after a warm-up."""
    bufs = []
    for d in devices:
        with torch.cuda.device(d):  # each rank's buffers and stream near its own GPU
            bufs.append((torch.empty(nbytes, dtype=torch.uint8, pin_memory=True),
                         torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{d}"),
                         torch.cuda.Stream(device=d)))
    rates = []
    for r in range(rounds + 1):
        start, ends = _all_at_once(devices, bufs, copies)
        if r:  # the first round warms up (allocator, peer mappings, clocks)
            rates.append(summed_gbps([nbytes * copies] * len(devices), start, ends))
    del bufs
    return statistics.median(rates)


def _all_at_once(devices, bufs, copies) -> tuple[float, list[float]]:
    """One round: (the common start, each device's end), perf_counter seconds."""
    go = threading.Barrier(len(devices) + 1)
    ends: list[float] = [0.0] * len(devices)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        host, dev, stream = bufs[k]
        try:
            with torch.cuda.device(devices[k]), torch.cuda.stream(stream):
                stream.synchronize()
                go.wait()
                for _ in range(copies):
                    dev.copy_(host, non_blocking=True)
                stream.synchronize()
                ends[k] = time.perf_counter()
        except BaseException as e:  # noqa: BLE001 - reported below, after every thread ends
            errors.append(e)
            go.abort()

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(devices))]
    for t in threads:
        t.start()
    try:
        go.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise KvcError(f"kvc profile: the all-GPUs H2D copy failed: {errors[0]}")
    return start, ends


def summed_gbps(nbytes: list[int], start: float, ends: list[float]) -> float:
    """Bytes moved by every device (`nbytes`, one entry each) over the time from their common
    start to the last one's end: the rate they reach together, GB/s (conservative: a device
    that finished early counts as if it had shared the whole span)."""
    span = max(ends) - start
    if span <= 0:
        raise ValueError(f"summed_gbps: no time passed ({span} s)")
    return sum(nbytes) / span / GB


def _peer_gbps(timer) -> float:
    """collective_gbps, by proxy: the rate of a device-to-device copy from GPU 1 into GPU 0
    (the fitted slope over 1 MB..256 MB). The logits all-gather moves each rank's rows over
    that same GPU-to-GPU link, but NCCL's ring reaches somewhat less than a raw peer copy, so
    this is an upper bound; collective_us (NCCL's launch and hand-shake, which one process
    cannot time) keeps its default. Small either way: the gathered logits are a few MB."""
    sizes = [1 << k for k in range(20, 29, 2)]
    with torch.cuda.device(0):
        dst = torch.empty(max(sizes), dtype=torch.uint8, device="cuda:0")
        src = torch.empty(max(sizes), dtype=torch.uint8, device="cuda:1")
        ts = [timer(lambda n=n: dst[:n].copy_(src[:n], non_blocking=True), 5) for n in sizes]
    _, per_byte = _fit_affine(sizes, ts)
    return 1 / per_byte / GB


def _both_directions(cuda, timer, h_src, d_dst, d_src, h_dst, reps) -> float:
    """Seconds for each of two equal copies running at once in opposite directions."""
    if cuda:
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

        def both():
            with torch.cuda.stream(s1):
                d_dst.copy_(h_src, non_blocking=True)
            with torch.cuda.stream(s2):
                h_dst.copy_(d_src, non_blocking=True)
            torch.cuda.current_stream().wait_stream(s1)
            torch.cuda.current_stream().wait_stream(s2)
        return timer(both, reps)

    def both():
        th = threading.Thread(target=lambda: h_dst.copy_(d_src))
        th.start()
        d_dst.copy_(h_src)
        th.join()
    return timer(both, reps)


def _memory_stream(dev, dt, timer, reps, cuda) -> float:
    """Read rate of a plain stream over device memory (GB/s): a sum over tensors past the
    caches, the slope between two sizes. What weight reads at small batch and elementwise
    passes run at (cost.layer_costs)."""
    sizes = [2 ** 26, 2 ** 28] if cuda else [2 ** 23, 2 ** 25]  # elements
    ts = []
    for n in sizes:
        x = torch.ones(n, device=dev, dtype=dt)
        ts.append(timer(lambda: x.sum(), reps))
    _, per_byte = _fit_affine([n * x.element_size() for n in sizes], ts)
    return 1 / per_byte / GB


def _queued_kernel_us(dev, timer, cuda, k: int = 400) -> float:
    """Device time of one small kernel queued behind others (µs): on CUDA, a burst of tiny
    kernels issued while the GPU sleeps, so the host is ahead and CUDA events time the GPU's
    side alone. On the CPU the host runs the kernels itself: the burst's wall time."""
    tiny = torch.zeros(1, device=dev)
    burst = lambda: [tiny.add_(1) for _ in range(k)]
    if not cuda:
        return timer(burst, 3) / k * 1e6
    burst()
    out = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(100_000_000)  # tens of ms: longer than the host takes to issue k
        start.record()
        burst()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3 / k)
    return statistics.median(out)


def _attention(dev, dt, timer, reps, cuda):
    """Decode attention (one query token) against context: fixed + K,V bytes / rate."""
    b, heads, hd = (8, 32, 128) if cuda else (2, 8, 64)
    ctxs = [256, 1024, 4096, 16384] if cuda else [256, 1024, 4096]
    p = torch.empty(0, dtype=dt).element_size()
    q = torch.randn(b, heads, 1, hd, device=dev).to(dt)
    ts, nbytes = [], []
    for s in ctxs:
        # distinct, contiguous K and V: one shared tensor would be read once, not twice
        k = torch.randn(b, heads, s, hd, device=dev).to(dt)
        v = torch.randn(b, heads, s, hd, device=dev).to(dt)
        with backends():  # the kernels kvc decodes with (kvc.runtime.attention)
            ts.append(timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), reps))
        nbytes.append(2 * b * heads * s * hd * p)
    fixed, per_byte = _fit_affine(nbytes, ts)
    return fixed, per_byte, p


def _overlap(cuda, dev, dt, timer, host, devb, side, h, hkv):
    """(compute slowdown while a copy runs, copy slowdown while compute runs)."""
    x = torch.randn(4096 if cuda else 256, h, device=dev).to(dt)
    w = torch.randn(h, 2 * hkv, device=dev).to(dt)
    n_gemm = 20 if cuda else 4
    gemms = lambda: [x @ w for _ in range(n_gemm)]
    copy = lambda: devb.copy_(host, non_blocking=True)
    t_gemm = timer(gemms, 3)
    t_copy = timer(copy, 3, stream=side)
    if cuda:
        # a copy long enough to cover the GEMMs, and GEMMs long enough to cover the copy
        reps_c = max(1, int(t_gemm / t_copy) + 1)
        reps_g = max(1, int(t_copy / t_gemm) + 1)
        with torch.cuda.stream(side):
            for _ in range(reps_c):
                copy()
        tg = timer(gemms, 1, warmup=0)
        torch.cuda.synchronize()
        for _ in range(reps_g):
            gemms()
        tc = timer(copy, 1, warmup=0, stream=side)
        torch.cuda.synchronize()
    else:
        stop = threading.Event()

        def loop(f):
            while not stop.is_set():
                f()
        tg = _while_running(loop, copy, lambda: timer(gemms, 3), stop)
        tc = _while_running(loop, gemms, lambda: timer(copy, 3), stop)
    return max(1.0, tg / t_gemm), max(1.0, tc / t_copy)


def _while_running(loop, background, measure, stop):
    stop.clear()
    th = threading.Thread(target=loop, args=(background,))
    th.start()
    try:
        return measure()
    finally:
        stop.set()
        th.join()


# --- machine identity, cache, YAML -------------------------------------------------------------

def _r(v: float, nd: int = 2) -> float:
    return float(round(v, nd))


def _host_mem_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return 16.0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str:
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+([\d.]+)", f.read())
            if m:
                return m.group(1)
    except OSError:
        pass
    try:  # sandboxes often hide /proc/driver; nvidia-smi still answers
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: str) -> dict:
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {
        "machine": platform.node(),
        "device_name": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "driver": _driver() if cuda else "",
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda or "",
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }

