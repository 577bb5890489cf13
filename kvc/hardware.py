"""HardwareConfig: what the cost model knows about a machine (a preset, a profile, or overrides)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace


@dataclass
class HardwareConfig:
    name: str = "cpu"
    device: str = "cpu"  # cuda | cpu: where the model computes
    h2d_gbps: float = 10.0  # pinned host->device copy bandwidth, GB/s (1e9 bytes/s)
    d2h_gbps: float = 10.0
    bidir_gbps: float = 8.0  # each direction, when both run at once
    link_latency_us: float = 10.0  # fixed cost of one copy
    gemm_tflops: float = 0.1  # dense GEMM rate at large row counts, model dtype
    gemm_half_rows: float = 0.0  # rows at which the GEMM reaches half its peak rate (0: flat)
    attn_gbps: float = 20.0  # K,V bytes the decode attention kernel reads per second
    attn_fixed_us: float = 10.0  # decode attention time at zero context (kernel floor)
    # device-memory read rate of a plain stream: weights in small-batch GEMMs, elementwise
    # passes. 0: attn_gbps (hardware files written before attention had its own rate)
    mem_gbps: float = 0.0
    gpu_mem_gb: float = 16.0  # device memory budget for weights + cache + staging
    cpu_mem_gb: float = 16.0  # host memory budget for the pinned pools
    mem_margin_gb: float = 1.0  # kept free on the device: CUDA context, allocator slack
    compute_slowdown: float = 1.0  # compute time multiplier while copies run
    copy_slowdown: float = 1.0  # copy time multiplier while compute runs
    # device time of one small kernel queued behind others (its run plus the gap to the next);
    # the host's time to issue it is the host lane's (host_*_us)
    launch_us: float = 5.0
    # host time to issue one node of the compiled step (fx + dispatch + launch), by kind
    host_module_us: float = 40.0  # an nn.Module call (Linear, LayerNorm, Embedding)
    host_op_us: float = 15.0  # an aten op
    host_view_us: float = 4.0  # a view (no kernel)
    host_kvc_us: float = 15.0  # a kvc custom op (copies, events, cache verbs)
    # a CUDA graph segment of the step (kvc.passes.cudagraphs): its input copy and replay
    host_graph_us: float = 30.0
    # the CPU attention lane (issue 17): decode attention over a slice of an offloaded layer's
    # cache, on the CPU (over the lane's head-major copy of the rows), beside the copies. K,V
    # bytes (in the model's dtype) it attends over per second with `cpu_attn_threads` threads
    # while the link copies (0: no lane: the planner never uses it; kvc.profiler.cpu_lane
    # measures it), and its fixed cost per layer and step (the query's copy down, the
    # hand-off to the worker, the partial's copy up, the merge)
    cpu_attn_gbps: float = 0.0
    cpu_attn_fixed_us: float = 150.0
    cpu_attn_threads: int = 0  # 0: the machine's cores minus two (the host thread, the OS)
    # several GPUs (issue 18, parallel.world_size): the pinned host-to-device rate all GPUs of
    # this host reach together when every one copies at once, summed (0: no shared limit known,
    # each GPU keeps h2d_gbps); and the logits all-gather among the ranks after each step: its
    # fixed cost and its rate (bytes each rank receives per second)
    host_link_gbps: float = 0.0
    collective_us: float = 30.0
    collective_gbps: float = 50.0
    measured: dict = field(default_factory=dict)  # machine, date, torch/cuda versions of a profile

    # GB everywhere means 1e9 bytes; GB/s likewise, TFLOP/s 1e12 FLOP/s.

    @property
    def stream_gbps(self) -> float:
        """mem_gbps, or attn_gbps where a hardware file predates mem_gbps."""
        return self.mem_gbps or self.attn_gbps

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareConfig":
        """From a hardware YAML mapping; unknown keys are an error naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            from kvc.errors import KvcError
            raise KvcError(f"hardware: unknown keys {unknown}; expected some of {sorted(names)}")
        return cls(**d)


def default_cpu_attn_threads() -> int:
    """The CPU attention lane's threads where hardware.cpu_attn_threads is 0: the cores less
    two (the host thread issuing the GPU's work, the OS)."""
    return max(1, (os.cpu_count() or 2) - 2)


def per_rank(hw: HardwareConfig, world_size: int) -> HardwareConfig:
    """The machine one of `world_size` ranks (one process per GPU, all copying at once) sees:
    each link's rate capped at its share of the host's summed rate (host_link_gbps / N, where
    measured), the host's pinned memory shared (cpu_mem_gb / N), and so are the CPU attention
    lane's cores and rate (every rank's lane runs at once on the same host: cpu_attn_threads
    // N threads, cpu_attn_gbps / N; no lane where that leaves a rank no thread).
    world_size 1: `hw` itself. The link rates are idempotent (a rank's config asked again
    gives the same rates); the memory and the lane's share are not, so call it once on the
    host's config."""
    if world_size == 1:
        return hw
    if world_size < 1:
        raise ValueError(f"per_rank: world_size {world_size} < 1")
    share = hw.host_link_gbps / world_size if hw.host_link_gbps > 0 else None
    rates = {k: min(getattr(hw, k), share) if share is not None else getattr(hw, k)
             for k in ("h2d_gbps", "d2h_gbps", "bidir_gbps")}
    lane = {}
    if hw.cpu_attn_gbps > 0:
        threads = (hw.cpu_attn_threads or default_cpu_attn_threads()) // world_size
        lane = {"cpu_attn_threads": threads,
                "cpu_attn_gbps": hw.cpu_attn_gbps / world_size if threads else 0.0}
    return replace(hw, cpu_mem_gb=hw.cpu_mem_gb / world_size, **rates, **lane)
