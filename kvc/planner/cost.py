"""Cost model: bytes, FLOPs and milliseconds per layer per decode step, from shapes alone.

Every time here is affine in the token counts (a per-token slope plus a fixed part), so the
scheduler's LP can use the slopes directly and `simulate` can evaluate any rounded plan
exactly with the same numbers. Units: bytes, FLOPs, milliseconds; `*_gbps` is 1e9 bytes/s.

GEMM time follows the profiler's fit `t = flops_per_row * (rows + r0) / F`: F is the peak
rate and r0 (`gemm_half_rows`) the rows at which the rate reaches half of F. Summed over the
chunks of a recompute, that is a slope in tokens plus r0 rows per chunk: still affine.

The planner's other jobs live next door and stay reachable as cost.<name>: bytes and FLOPs
(sizes.py), the walk of the step's lanes (lanes.py: simulate, intervals), GPU and host memory
(memory.py) and the host lane (host.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvc.dtypes import dtype_bytes
from kvc.hardware import HardwareConfig
from kvc.models import costs as family_costs
from kvc.models import layer_param_count
from kvc.models.spec import ModelSpec
from kvc.planner.sizes import (GB, act_bytes, kv_bytes, layer_weight_bytes, recompute_flops,
                               writeback_bytes)
# what callers reach as cost.<name>: the byte counts, the step's walk, memory, the host lane
from kvc.planner.sizes import layer_contexts, longest_context, weight_bytes  # noqa: F401
from kvc.planner.lanes import intervals, simulate  # noqa: F401
from kvc.planner.memory import (host_pool_bytes, memory_terms, staging_bytes,  # noqa: F401
                                workspace_bytes)
from kvc.planner.host import HOST_KINDS, host_ms, host_node_kinds, host_nodes  # noqa: F401

# --- times ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerCosts:
    """Per-layer time coefficients (ms) for one model, batch, dtype and machine.

    `*_per_tok` are slopes in tokens; `*_fixed` are paid once per copy / chunk / layer.
    The slowdown factors are applied here, once, because in every offloaded schedule the
    copies and the compute of a step run side by side for most of it.
    """
    act_per_tok: float  # H2D activation copy
    kv_per_tok: float  # H2D K+V copy
    rec_per_tok: float  # K/V recompute on the GPU
    attn_per_tok: float  # decode attention reading K,V from GPU memory
    copy_fixed: float  # one H2D copy's latency
    rec_chunk_fixed: float  # one recompute chunk: GEMM r0 rows, weight read, launches
    layer_fixed: float  # the new token through the layer (weights GEMMs, launches)
    writeback: float  # D2H of the new token's activation and K,V (3 copies)
    head: float  # final norm + LM head for the step
    compute_slowdown: float
    copy_slowdown: float
    weight_copy: float = 0.0  # H2D of one layer's weights (all of them), when it streams them
    # the part of layer_fixed after attention (output projection, MLP): the staging slot is
    # free once attention has read it (passes/streams.py, slot_free), before this part runs
    layer_back: float = 0.0
    # the part before attention that reads no staged K,V (norm, Q/K/V projections of the new
    # token): the runtime issues it first in the layer, so it runs while the layer's copies land
    layer_front: float = 0.0
    # the CPU attention lane (issue 17): per cached token it attends to on the host (K,V bytes
    # at hardware.cpu_attn_gbps; 0: no lane) and its fixed part per unit and step (the query
    # down, the hand-off, the partial up, the merge). Never slowed down: the GPU's streams
    # do not run on the host's cores.
    cpu_per_tok: float = 0.0
    cpu_fixed: float = 0.0
    # a token split over several GPUs (Plan.split "tokens"): after an offloaded unit's
    # attention over its share, the all-gather of every rank's partial (out, lse) and their
    # log-sum-exp merge, on the compute stream before the rest of the layer (0: no split)
    merge: float = 0.0

    @property
    def cpu_lane(self) -> bool:
        """The machine has a CPU attention lane (hardware.cpu_attn_gbps > 0)."""
        return self.cpu_per_tok > 0


def layer_costs(spec: ModelSpec, hw: HardwareConfig, b: int, dtype: str, offloaded=True,
                shares: int = 1) -> LayerCosts:
    """`shares` > 1: a token split over that many ranks (Plan.context_shares), whose
    offloaded units pay `merge_ms` after their attention."""
    p = dtype_bytes(dtype)
    h, hkv = spec.hidden_size, spec.kv_width
    F = hw.gemm_tflops * 1e12
    r0 = hw.gemm_half_rows
    h2d = hw.h2d_gbps * GB
    mem = hw.stream_gbps * GB  # weight reads and elementwise passes
    attn = hw.attn_gbps * GB  # the decode attention kernel's K,V read
    lat = hw.link_latency_us * 1e-3
    launch = hw.launch_us * 1e-3
    cs = hw.compute_slowdown if offloaded else 1.0
    ks = hw.copy_slowdown if offloaded else 1.0
    ms = 1e3

    P = layer_param_count(spec)
    fam = family_costs(spec)
    # decode GEMMs read every weight once; at small batch that read, not the FLOPs, bounds it
    weights_ms = max(2 * P * (b + r0) / F, P * p / mem) * ms
    back = 1.0 - (h * spec.q_width + 2 * h * hkv) / P  # all but the Q, K, V projections
    rec_w = 2 * h * hkv  # K and V projection weights
    rec_chunk = (2 * rec_w * r0 / F + rec_w * p / mem) * ms + fam.recompute_ops * launch
    head_p = spec.vocab_size * spec.word_embed_proj_dim
    head = max(2 * head_p * (b + r0) / F, head_p * p / mem) * ms + 4 * launch
    # the D2H stream shares the link with H2D copies, so it gets the both-directions rate
    wb = writeback_bytes(spec, b, p) / (min(hw.d2h_gbps, hw.bidir_gbps) * GB) * ms + 3 * lat
    return LayerCosts(
        act_per_tok=act_bytes(spec, b, 1, p) / h2d * ms * ks,
        kv_per_tok=kv_bytes(spec, b, 1, p) / h2d * ms * ks,
        rec_per_tok=(recompute_flops(spec, b, 1) / F
                     + fam.elementwise_passes * kv_bytes(spec, b, 1, p) / 2 / mem) * ms * cs,
        attn_per_tok=kv_bytes(spec, b, 1, p) / attn * ms * cs,
        copy_fixed=lat * ks,
        rec_chunk_fixed=rec_chunk * cs,
        layer_fixed=(weights_ms + fam.layer_ops * launch + hw.attn_fixed_us * 1e-3) * cs,
        writeback=wb,
        head=head * cs,
        compute_slowdown=cs,
        copy_slowdown=ks,
        weight_copy=(layer_weight_bytes(spec, p) / h2d * ms + lat) * ks,
        layer_back=(weights_ms * back + fam.layer_ops / 2 * launch) * cs,
        layer_front=(weights_ms * (1 - back) + fam.layer_ops / 2 * launch) * cs,
        cpu_per_tok=(kv_bytes(spec, b, 1, p) / (hw.cpu_attn_gbps * GB) * ms
                     if hw.cpu_attn_gbps > 0 else 0.0),
        cpu_fixed=hw.cpu_attn_fixed_us * 1e-3,
        merge=merge_ms(spec, hw, shares, b, cs) if shares > 1 else 0.0,
    )


MERGE_OPS = 4  # kernels of the log-sum-exp merge (max, exp weights, weighted sum, normalise)


def merge_ms(spec: ModelSpec, hw: HardwareConfig, ranks: int, b: int, slowdown: float = 1.0) -> float:
    """A token split's per-unit merge (ms): the all-gather of every rank's partial attention
    output and log-sum-exp, [b, heads, head_dim] and [b, heads] float32 (each rank receives
    the other ranks' (ranks - 1) x b x heads x (head_dim + 1) x 4 bytes at
    hardware.collective_gbps after collective_us), then the elementwise merge reading all
    ranks' partials (twice, at stream_gbps) in MERGE_OPS kernels."""
    part = b * spec.num_heads * (spec.head_dim + 1) * 4
    gather = hw.collective_us * 1e-3 + (ranks - 1) * part / (hw.collective_gbps * GB) * 1e3
    merge = (2 * ranks * part / (hw.stream_gbps * GB) * 1e3 + MERGE_OPS * hw.launch_us * 1e-3) * slowdown
    return gather + merge


def durations(c: LayerCosts, s, l, resident, act_chunks: int, cpu=0):
    """Per-layer stream durations (ms) at context s with l recomputed and `cpu` tokens
    attended to on the CPU (cpu_durations): arrays broadcast. s is each layer's own context
    (sizes.layer_contexts: a sliding-window layer's window).

    Returns (A, K, R, C, D): activation copy, K,V copy, recompute, the layer's own compute
    (its attention over the tokens the GPU holds), write-back. Fixed parts are only paid when
    the work they belong to exists, so a plan that recomputes nothing costs exactly what full
    offload costs.
    """
    s = np.asarray(s, dtype=float)
    l = np.asarray(l, dtype=float)
    off = ~np.asarray(resident, dtype=bool)
    cpu = np.where(off, np.asarray(cpu, dtype=float), 0.0)
    kv = np.where(off, s - l - cpu, 0.0)
    l = np.where(off, l, 0.0)
    uses = l > 0
    A = np.where(uses, c.act_per_tok * l + act_chunks * c.copy_fixed, 0.0)
    K = np.where(kv > 0, c.kv_per_tok * kv + 2 * c.copy_fixed, 0.0)
    R = np.where(uses, c.rec_per_tok * l + act_chunks * c.rec_chunk_fixed, 0.0)
    # attention reads the s cached tokens plus the new one, resident or not
    C = c.layer_fixed + c.attn_per_tok * (s + 1 - cpu) + 0 * l
    D = np.where(off, c.writeback, 0.0) + 0 * l
    return A, K, R, C, D


def cpu_durations(c: LayerCosts, cpu) -> np.ndarray:
    """P per unit (ms): the CPU lane's attention over `cpu` cached tokens (the fixed part only
    where it attends to any)."""
    cpu = np.asarray(cpu, dtype=float)
    return np.where(cpu > 0, c.cpu_fixed + c.cpu_per_tok * cpu, 0.0)


def weight_durations(c: LayerCosts, streamed, shape=(), micro_batches: int = 1) -> np.ndarray:
    """W per unit (ms): the weight copy a streamed layer puts on the copy stream ahead of the
    activation / K,V copies of its first unit (its other micro-batches use the same copy); 0
    for resident weights. `streamed`: per layer, the fraction of its weight bytes streamed
    (booleans: all or nothing). `shape`: trailing (context) shape."""
    f = np.asarray(streamed, dtype=float)
    w = np.where(f > 0, f * (c.weight_copy - c.copy_fixed) + c.copy_fixed, 0.0)
    units = np.zeros(len(w) * micro_batches)
    units[::micro_batches] = w
    return units.reshape(units.shape + (1,) * len(shape)) + np.zeros(shape)


def per_unit(x, micro_batches: int):
    """A per-layer array repeated for each of the layer's micro-batches (units, Plan "Units")."""
    return np.repeat(np.asarray(x), micro_batches, axis=0)
