"""Cost model: bytes, FLOPs and milliseconds per layer per decode step, from shapes alone.

Every time here is affine in the token counts (a per-token slope plus a fixed part), so the
scheduler's LP can use the slopes directly and `simulate` can evaluate any rounded plan
exactly with the same numbers. Units: bytes, FLOPs, milliseconds; `*_gbps` is 1e9 bytes/s.

GEMM time follows the profiler's fit `t = flops_per_row * (rows + r0) / F`: F is the peak
rate and r0 (`gemm_half_rows`) the rows at which the rate reaches half of F. Summed over the
chunks of a recompute, that is a slope in tokens plus r0 rows per chunk: still affine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvc.hardware import HardwareConfig
from kvc.dtypes import dtype_bytes
from kvc.models import costs as family_costs
from kvc.models import layer_param_count, param_count
from kvc.models.spec import ModelSpec
from kvc.planner.lanes import intervals, simulate  # noqa: F401  (cost.simulate, cost.intervals)

GB = 1e9
# nodes of the lowered decode graph the host issues, one at a time, per decode step, by kind
# (HOST_KINDS: module calls, aten ops, views, kvc custom ops; a module call costs several
# times a view): a layer, an offloaded layer's write-back/prefetch/event nodes, a recomputing
# layer's fixed nodes and each chunk's (the cloned K/V subgraph, staged_act, put_recomputed,
# its wait), the head, a weight-streamed layer's prefetch_weights and its record/wait pairs,
# and grouped-query attention's K,V head expansion. Micro-batches (passes/microbatch.py): the
# split and the final concatenation once, an embedding, head and batch slice per extra
# micro-batch, and nodes that read no tokens (RoPE table slices) once per layer, not per unit.
# tests/test_cost.py checks these against kvc.compiler.lowering; at small batch they bound the step.
HOST_KINDS = ("module", "op", "view", "kvc", "graph")
HOST_NODES = {  # passes/flatten.py calls Linear, LayerNorm and Embedding as functionals (ops)
    "opt": {"layer": (0, 13, 10, 2, 0), "head": (0, 6, 0, 0, 0), "offload": (0, 0, 0, 10, 0),
            "recompute": (0, 0, 0, 3, 0), "chunk": (0, 2, 5, 5, 0), "weights": (0, 0, 0, 5, 0),
            "gqa": (0, 0, 0, 0, 0), "split": (0, 2, 1, 0, 0), "per_micro_batch": (0, 4, 1, 0, 0),
            "shared_per_layer": (0, 0, 0, 0, 0), "gqa_offload": (0, 0, 0, 0, 0)},
    "llama": {"layer": (0, 40, 20, 2, 0), "head": (0, 9, 5, 0, 0), "offload": (0, 0, 0, 10, 0),
              "recompute": (0, 0, 0, 3, 0), "chunk": (0, 9, 16, 6, 0), "weights": (0, 0, 0, 5, 0),
              "gqa": (0, 0, 4, 0, 0), "split": (0, 2, 1, 0, 0), "per_micro_batch": (0, 9, 2, 0, 0),
              "shared_per_layer": (0, 0, 4, 0, 0), "gqa_offload": (0, 0, 0, 0, 0)},
}
# the same step run as piecewise CUDA graphs (kvc.passes.cudagraphs): a layer is one
# segment call (kind "graph": its input copy and replay), its two cache ops, the views of the
# cache and attention; the head's nodes join the last segment and the embedding a first one.
# A value that leaves the step (the logits) or that another stream reads (offload_kv's K,V;
# offload_act's activation) is cloned after the replay (an op). Segments never cross an event
# recorded or awaited on the compute stream, which cuts an offloaded layer once more where
# its K,V are recorded for the write-back, a recomputing layer where its activation is, and a
# weight-streamed layer at its weights' wait and slot-free record. Views left alone between
# two events (OPT's Q transpose, grouped-query attention's Q reshape) stay eager views.
# Rows not named here (a recomputed chunk) are eager as before.
_GRAPHED = {"layer": (0, 1, 4, 2, 1), "head": (0, 1, 0, 0, 1), "gqa": (0, 0, 0, 0, 0),
            "gqa_offload": (0, 0, 2, 0, 0),
            "recompute": (0, 1, 0, 3, 1), "weights": (0, 0, 0, 5, 2),
            "split": (0, 0, 0, 0, 0), "per_micro_batch": (0, 0, 0, 0, 0),
            "shared_per_layer": (0, 0, 0, 0, 0)}
GRAPHED_NODES = {"opt": {**_GRAPHED, "offload": (0, 2, 1, 10, 1)},
                 "llama": {**_GRAPHED, "offload": (0, 2, 0, 10, 1)}}


def host_node_kinds(spec: ModelSpec, resident, recomputes, act_chunks: int, streamed=None,
                    micro_batches: int = 1, graphed: bool = False) -> np.ndarray:
    """Nodes per decode step by kind ([len(HOST_KINDS)]); `resident` and `recomputes` are
    per-unit booleans (arrays), `streamed` per layer (weights). `graphed`: the step runs as
    piecewise CUDA graphs (GRAPHED_NODES)."""
    rows = {**HOST_NODES[spec.family], **(GRAPHED_NODES[spec.family] if graphed else {})}
    n = {k: np.array(v) for k, v in rows.items()}
    gqa = spec.num_kv_heads < spec.num_heads
    layer = n["layer"] + (n["gqa"] if gqa else 0)
    off = ~np.asarray(resident, dtype=bool)
    rec = np.asarray(recomputes, dtype=bool) & off
    total = (len(off) * layer + off.sum() * (n["offload"] + (n["gqa_offload"] if gqa else 0))
             + rec.sum() * (n["recompute"] + act_chunks * n["chunk"]) + n["head"])
    if micro_batches > 1:
        layers = len(off) // micro_batches
        total = total + n["split"] + (micro_batches - 1) * (
            n["per_micro_batch"] - layers * n["shared_per_layer"])
    if streamed is not None and len(streamed):
        total = total + n["weights"] * int(np.count_nonzero(np.asarray(streamed, dtype=float)))
    return total


def host_nodes(spec: ModelSpec, resident, recomputes, act_chunks: int, streamed=None,
               micro_batches: int = 1, graphed: bool = False) -> int:
    """Nodes per decode step, all kinds together."""
    return int(host_node_kinds(spec, resident, recomputes, act_chunks, streamed, micro_batches,
                               graphed).sum())


def host_ms(hw: HardwareConfig, kinds, spec: ModelSpec) -> float:
    """Host time to issue nodes counted by kind (host_node_kinds) of `spec`'s decode graph."""
    us = np.array([hw.host_module_us, hw.host_op_us * family_costs(spec).host_op_weight,
                   hw.host_view_us, hw.host_kvc_us, hw.host_graph_us])
    return float(np.asarray(kinds) @ us) * 1e-3


# --- bytes and FLOPs ----------------------------------------------------------------------

def act_bytes(spec: ModelSpec, b: int, tokens, p: int):
    """A layer's input activations for `tokens` cached tokens: what ships instead of K,V."""
    return b * tokens * spec.hidden_size * p


def kv_bytes(spec: ModelSpec, b: int, tokens, p: int):
    return 2 * b * tokens * spec.kv_width * p


def recompute_flops(spec: ModelSpec, b: int, tokens):
    """K and V projections of `tokens` activations: 2 GEMMs of [b*l, h] @ [h, h_kv]."""
    return 2 * b * tokens * spec.hidden_size * 2 * spec.kv_width


def weight_bytes(spec: ModelSpec, p: int) -> int:
    return param_count(spec) * p


def layer_weight_bytes(spec: ModelSpec, p: int) -> int:
    """One decoder layer's parameters: what a weight-streamed layer copies each step."""
    return layer_param_count(spec) * p


def writeback_bytes(spec: ModelSpec, b: int, p: int) -> int:
    """The new token's activation and K,V, back to the CPU pools each step (per layer)."""
    return b * (spec.hidden_size + 2 * spec.kv_width) * p


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


def layer_costs(spec: ModelSpec, hw: HardwareConfig, b: int, dtype: str, offloaded=True) -> LayerCosts:
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
    )


def durations(c: LayerCosts, s, l, resident, act_chunks: int):
    """Per-layer stream durations (ms) at context s with l recomputed: arrays broadcast.

    Returns (A, K, R, C, D): activation copy, K,V copy, recompute, the layer's own compute,
    write-back. Fixed parts are only paid when the work they belong to exists, so a plan that
    recomputes nothing costs exactly what full offload costs.
    """
    s = np.asarray(s, dtype=float)
    l = np.asarray(l, dtype=float)
    off = ~np.asarray(resident, dtype=bool)
    kv = np.where(off, s - l, 0.0)
    l = np.where(off, l, 0.0)
    uses = l > 0
    A = np.where(uses, c.act_per_tok * l + act_chunks * c.copy_fixed, 0.0)
    K = np.where(kv > 0, c.kv_per_tok * kv + 2 * c.copy_fixed, 0.0)
    R = np.where(uses, c.rec_per_tok * l + act_chunks * c.rec_chunk_fixed, 0.0)
    # attention reads the s cached tokens plus the new one, resident or not
    C = c.layer_fixed + c.attn_per_tok * (s + 1) + 0 * l
    D = np.where(off, c.writeback, 0.0) + 0 * l
    return A, K, R, C, D


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


# --- memory ----------------------------------------------------------------------------------

def workspace_bytes(spec: ModelSpec, b: int, s_max: int, p: int) -> int:
    """Transient activations of one step: MLP intermediates, fp32 logits, attention scores."""
    inter = b * (4 * spec.hidden_size + 2 * spec.intermediate_size) * p
    return inter + b * spec.vocab_size * 4 + b * spec.num_heads * (s_max + 1) * 4


def staging_bytes(spec: ModelSpec, b: int, s_max: int, p: int, buffers: int, with_act: bool) -> int:
    """GPU staging for offloaded layers: per buffer, K,V of all s tokens (transferred tail and
    recomputed head land in the same buffer, so attention reads one tensor), plus the
    activations of the recomputed head when the plan recomputes anything."""
    per = kv_bytes(spec, b, s_max + 1, p) + (act_bytes(spec, b, s_max, p) if with_act else 0)
    return buffers * per


def memory_terms(spec: ModelSpec, hw: HardwareConfig, b: int, s_max: int, dtype: str,
                 buffers: int, with_act: bool, streamed_layers=0, micro_batches: int = 1) -> dict:
    """GB figures for the GPU budget; `free_gb` is what is left for resident KV caches.

    `streamed_layers`: how many whole layers keep their weights in pinned CPU memory, or per
    layer the fraction of its weight bytes that does. Those bytes come off the resident
    weights, and two GPU weight slots, each the size of the largest streamed part (one slot
    if only one layer streams), come on as `weight_slots_gb`. The keys appear only when
    something streams. With micro-batches, staging and the step's transients are per
    micro-batch of b / micro_batches (the logits and hidden states of all of them live until
    the step ends); a resident layer's cache holds the whole batch (`layer_kv_gb`).
    """
    p = dtype_bytes(dtype)
    lw = layer_weight_bytes(spec, p)
    if np.ndim(streamed_layers):
        frac = np.clip(np.asarray(streamed_layers, dtype=float), 0.0, 1.0)
    else:
        n = max(0, min(spec.num_layers, int(streamed_layers)))
        frac = np.array([1.0] * n)
    bm = b // max(1, micro_batches)
    rest = (b - bm) * (spec.vocab_size * 4 + 2 * spec.hidden_size * p)
    t = {
        "weights_gb": (weight_bytes(spec, p) - float(frac.sum()) * lw) / GB,
        "staging_gb": staging_bytes(spec, bm, s_max, p, buffers, with_act) / GB if buffers else 0.0,
        "workspace_gb": (workspace_bytes(spec, bm, s_max, p) + rest) / GB,
        "margin_gb": hw.mem_margin_gb,
        "layer_kv_gb": kv_bytes(spec, b, s_max + 1, p) / GB,
    }
    t["free_gb"] = hw.gpu_mem_gb - t["weights_gb"] - t["staging_gb"] - t["workspace_gb"] - t["margin_gb"]
    n = int(np.count_nonzero(frac))
    if n:
        t["weights_streamed"] = round(float(frac.sum()), 4)
        t["weight_slots_gb"] = min(n, 2) * float(frac.max()) * lw / GB
        t["free_gb"] -= t["weight_slots_gb"]
    return t


def host_pool_bytes(spec: ModelSpec, b: int, max_tokens: int, p: int, offloaded: int,
                    act_rows: int, kv_lo: int = 0) -> int:
    """What OffloadedCache pins, for each offloaded layer: activations of the recomputed rows
    [0, act_rows), K,V of the rows read back as K,V, [kv_lo, max_tokens) (Plan.min_kv_row)."""
    return offloaded * (kv_bytes(spec, b, max_tokens - kv_lo, p) + act_bytes(spec, b, act_rows, p))

