"""Measure this machine into a HardwareConfig: link bandwidth and latency, GEMM rate against
rows, decode attention against context, and how copies and compute slow each other.

Every figure is a median over repeats after a warm-up, fitted to the affine forms cost.py
uses (time = fixed + size / rate), so a profile plugs straight into the cost model. On CUDA
times come from CUDA events on the stream that ran the work; on CPU the "device" is the CPU
itself, the "link" is a memcpy between two host buffers (what the runtime does there), and a
run takes well under 20 s so that plans made on a CPU are measured, not invented.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from kvc.cost import HOST_KINDS
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.runtime.attention import backends

GB = 1e9
# the K/V projection shape of a 7B-class multi-head model: what recompute runs
CUDA_SHAPE = {"h": 4096, "hkv": 4096, "rows": [16, 64, 256, 1024, 4096, 16384], "reps": 10}
CPU_SHAPE = {"h": 1024, "hkv": 1024, "rows": [16, 64, 256, 1024, 2048], "reps": 7}
STEPS = ("H2D copies", "D2H copies", "both directions", "GEMM rate", "attention",
         "memory stream", "overlap", "kernel and host overhead")


class _Progress:
    """A one-line text bar on stderr; silent when disabled."""

    def __init__(self, on: bool, total: int):
        self.on, self.total, self.done = on, total, 0

    def step(self, what: str) -> None:
        if self.on:
            n = 24 * self.done // self.total
            sys.stderr.write(f"\rkvc profile [{'#' * n}{'.' * (24 - n)}] {self.done}/{self.total} {what:<18}")
            sys.stderr.flush()
        self.done += 1

    def finish(self) -> None:
        if self.on:
            sys.stderr.write(f"\rkvc profile [{'#' * 24}] {self.total}/{self.total} done{' ' * 16}\n")


def _fit_affine(xs, ts) -> tuple[float, float]:
    """t = a + b*x, least squares in relative error (small sizes matter as much as big)."""
    x, t = np.asarray(xs, float), np.asarray(ts, float)
    w = 1.0 / t
    M = np.stack([w, w * x], axis=1)
    (a, b), *_ = np.linalg.lstsq(M, t * w, rcond=None)
    if b > 0 and a >= 0:
        return float(a), float(b)
    # noise (a busy host) can tilt the fit
    i = int(np.argmax(x))
    if b > 0:  # negative intercept: a pure rate through the largest point
        return 0.0, float(t[i] / x[i])
    # no growth with size seen: the fastest time is the fixed part, the largest size's excess
    # (at least a sliver of its time) the rate, so no rate the machine never showed is claimed
    a = float(t.min())
    return a, max(float(t[i]) - a, 1e-2 * float(t[i])) / float(x[i])


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
    bar = _Progress(progress, len(STEPS))
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

    bar.step(STEPS[0])
    h2d_lat, h2d_b = link("h2d")
    bar.step(STEPS[1])
    d2h_lat, d2h_b = link("d2h")

    bar.step(STEPS[2])
    n = max(sizes) // 2
    host2 = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
    devb2 = torch.empty(n, dtype=torch.uint8, device=dev)
    bidir_s = _both_directions(cuda, timer, host[:n], devb[:n], devb2, host2, reps)
    bidir_gbps = min(n / bidir_s / GB, 1 / h2d_b / GB, 1 / d2h_b / GB)

    bar.step(STEPS[3])
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

    bar.step(STEPS[4])
    attn_fixed, attn_per_byte, p = _attention(dev, dt, timer, reps, cuda)

    bar.step(STEPS[5])
    mem_gbps = _memory_stream(dev, dt, timer, reps, cuda)

    bar.step(STEPS[6])
    comp_slow, copy_slow = _overlap(cuda, dev, dt, timer, host, devb, side, h, hkv)

    bar.step(STEPS[7])
    launch_us = _queued_kernel_us(dev, timer, cuda)
    host = host_us(dev, dt)

    bar.finish()
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
        **{k: _r(v) for k, v in host.items()},
        measured={**machine_info(device), "dtype": str(dt).replace("torch.", ""),
                  "gemm_shape": f"[rows x {h}] @ [{h} x {2 * hkv}]",
                  "gemm_rows": shape["rows"], "gemm_ms": [_r(t * 1e3, 4) for t in gts]},
    )


# nodes one repeat of each host chain issues (cost.HOST_KINDS)
CHAIN_NODES = {"module": 1, "op": 1, "view": 2, "kvc": 4, "graph": 1}
GRAPH_KERNELS = 16  # kernels in the timed CUDA graph segment (a decode layer's are 15-45)
ROUNDS = 21  # timed runs of each host chain (median)


def host_us(device, dtype=torch.float16, repeats: int = 100) -> dict:
    """Host time (µs) to issue one node of each kind, as an fx GraphModule issues them (one
    call each, with the GPU left to run behind: no sync inside the timing): a Linear module
    called the way the lowered decode graphs call theirs (a flat alias, passes/flatten.py),
    an aten op, a view, and kvc custom ops in the step's mix (record and wait an event,
    prefetch an activation chunk and a K,V tail) against a real, tiny OffloadedCache, and on
    CUDA a captured graph segment (kvc.runtime.cudagraphs.Segment) called with an input it
    copies in, as attention's output is. Keys: host_module_us, host_op_us, host_view_us,
    host_kvc_us, and on CUDA host_graph_us (a CPU runs no graphs: the field keeps its value)."""
    import statistics
    import time

    import torch.fx

    import kvc.runtime.ops  # noqa: F401
    from kvc.passes.flatten import flatten_targets
    from kvc.runtime import registry
    from kvc.runtime.ops import direct_calls

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k_proj = torch.nn.Linear(8, 8, device=device, dtype=dtype)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attn()

    def chain(kind):
        class Chain(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList([Layer()])

            def forward(self, t, rt: int):
                for _ in range(repeats):
                    if kind == "module":
                        t = self.layers[0].self_attn.k_proj(t)
                    elif kind == "op":
                        t = t + 1.0
                    elif kind == "view":
                        t = t.unflatten(-1, (2, 4))
                        t = t.flatten(-2)
                    else:  # the compiled step's kvc mix: half events, half copies
                        torch.ops.kvc.record_event(rt, 0, 0)
                        torch.ops.kvc.wait_event(rt, 1, 0)
                        torch.ops.kvc.prefetch_act(rt, 1, 0, 0)
                        torch.ops.kvc.prefetch_kv(rt, 1, 0)
                return t
        gm = torch.fx.symbolic_trace(Chain())
        flatten_targets(gm, functional=False)  # a module call as the lowering leaves one
        return direct_calls(gm)  # kvc ops called as CompiledModel calls them

    cache = _tiny_cache(device, dtype)  # real pools, streams and events, a few KB
    rt = registry.register(cache)
    out = {}
    try:
        t = torch.zeros(2, 8, device=device, dtype=dtype)
        gms = {kind: chain(kind) for kind in HOST_KINDS if kind != "graph"}
        if t.is_cuda:
            gms["graph"] = _graph_chain(t, repeats)
        for gm in gms.values():
            gm(t, rt)
        # the kinds take turns, round after round, so that a slow spell of the host (other
        # tenants, clocks) lands on every kind's samples alike, not on one kind's whole series
        times = {kind: [] for kind in gms}
        for _ in range(ROUNDS):
            for kind, gm in gms.items():
                if t.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                gm(t, rt)
                times[kind].append(time.perf_counter() - t0)
        for kind, ts in times.items():
            out[f"host_{kind}_us"] = statistics.median(ts) / (CHAIN_NODES[kind] * repeats) * 1e6
    finally:
        registry.release(rt)
        cache.close()
    return out


def _graph_chain(t: torch.Tensor, repeats: int):
    """`repeats` calls of a captured CUDA graph segment of GRAPH_KERNELS small kernels."""
    import torch.fx

    from kvc.runtime.cudagraphs import GraphSet, Segment

    class Body(torch.nn.Module):
        def forward(self, x):
            for _ in range(GRAPH_KERNELS // 2):
                x = x * 1.0 + 1.0
            return (x,)

    segment = Segment(torch.fx.symbolic_trace(Body()), (), GraphSet(capture=True))
    segment(t)  # warm-up
    segment(t)  # capture

    def run(x, rt):
        for _ in range(repeats):
            segment(x)  # x is no segment's output: copied into the graph's input buffer
        return x
    return run


def _tiny_cache(device, dtype):
    """An OffloadedCache for one offloaded layer that recomputes half of 16 tokens: what the
    kvc ops of a compiled step call into (pinned pools, copy streams, events)."""
    from kvc.plan import forced_plan
    from kvc.runtime.offloaded import OffloadedCache

    plan = forced_plan("pipelined", 1, 16, 1, 8, 0.5)
    cache = OffloadedCache(plan, num_layers=1, batch=1, max_tokens=17, act_width=8, num_kv_heads=1,
                           head_dim=8, dtype=dtype, device=torch.device(device), num_events=8)
    cache.begin_step(16, 1)
    return cache


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


# what the profiler measures and means by it; a cached profile of another version is measured
# again. 2: launch_us is a queued kernel's device time (was the host's issue time), mem_gbps
# is measured, attention is timed with the kernels kvc decodes with (never cuDNN)
PROFILE_VERSION = 2


def cache_path(device: str) -> Path:
    """Per machine: GPU name, driver and torch version (a driver or torch upgrade re-measures),
    and the profiler's PROFILE_VERSION (so does a profiler that measures differently)."""
    info = machine_info(device)
    key = "-".join(x for x in (info["device_name"], info["driver"], "torch" + info["torch"],
                               f"v{PROFILE_VERSION}") if x)
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", key).strip("_")
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "kvc" / "hardware" / f"{slug}.yaml"


def resolve_hardware(hw: HardwareConfig, progress: bool = True) -> HardwareConfig:
    """`auto`: the cached profile of this machine (measured on first use); fields the user
    overrode (anything differing from a bare `auto`) win over the measurement. Others as is."""
    if hw.name != "auto":
        return hw
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = cache_path(device)
    if path.is_file():
        try:
            prof = read_profile_yaml(path)
        except (KvcError, OSError, yaml.YAMLError):
            prof = None  # a corrupt cache entry is re-measured, not fatal
    else:
        prof = None
    if prof is None:
        prof = profile(device, progress=progress)
        write_profile_yaml(prof, path)
    bare = HardwareConfig(name="auto")
    overrides = {f.name: getattr(hw, f.name) for f in fields(hw)
                 if f.name not in ("name", "measured") and getattr(hw, f.name) != getattr(bare, f.name)}
    return HardwareConfig(**{**asdict(prof), **overrides})


def write_profile_yaml(hw: HardwareConfig, path) -> None:
    """A flat mapping the `hardware` config group accepts; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = hw.measured or {}
    head = (f"# kvc profile of {m.get('device_name', hw.device)} on {m.get('machine', '?')}, "
            f"{m.get('date', '?')}; torch {m.get('torch', '?')}, CUDA {m.get('cuda') or '-'}\n")
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(head + yaml.safe_dump(asdict(hw), sort_keys=False))
    tmp.replace(path)


def read_profile_yaml(path) -> HardwareConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise KvcError(f"{path}: expected a mapping of hardware fields")
    return HardwareConfig.from_dict(data)
