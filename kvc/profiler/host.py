"""Host time to issue one node of each kind (kvc.ir.graph.HOST_KINDS), measured as a compiled
step issues them: through an fx GraphModule, kvc ops called directly, against a real tiny
OffloadedCache, and on CUDA a captured graph segment. The planner's host lane prices a step's
nodes with these (hardware.host_*_us).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.fx

from kvc.ir import registry
from kvc.ir.graph import HOST_KINDS, direct_calls
from kvc.ir.plan import forced_plan
from kvc.passes.flatten import flatten_targets
from kvc.runtime.offloaded import OffloadedCache
from kvc.runtime.segments import Segment, SegmentSet

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
    CUDA a captured graph segment (kvc.runtime.segments.Segment) called with an input it
    copies in, as attention's output is. Keys: host_module_us, host_op_us, host_view_us,
    host_kvc_us, and on CUDA host_graph_us (a CPU runs no graphs: the field keeps its value)."""
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
    class Body(torch.nn.Module):
        def forward(self, x):
            for _ in range(GRAPH_KERNELS // 2):
                x = x * 1.0 + 1.0
            return (x,)

    segment = Segment(torch.fx.symbolic_trace(Body()), (), SegmentSet(capture=True))
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
    plan = forced_plan("pipelined", 1, 16, 1, 8, 0.5)
    cache = OffloadedCache(plan, num_layers=1, batch=1, max_tokens=17, act_width=8, num_kv_heads=1,
                           head_dim=8, dtype=dtype, device=torch.device(device), num_events=8)
    cache.begin_step(16, 1)
    return cache


