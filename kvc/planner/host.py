"""The host lane: nodes of the lowered decode graph the host issues one at a time, and the
time it takes to issue them."""
from __future__ import annotations

import numpy as np

from kvc.hardware import HardwareConfig
from kvc.ir.graph import HOST_KINDS  # noqa: F401  (cost.HOST_KINDS)
from kvc.models import costs as family_costs
from kvc.models.spec import ModelSpec

# nodes of the lowered decode graph the host issues, one at a time, per decode step, by kind
# (HOST_KINDS: module calls, aten ops, views, kvc custom ops; a module call costs several
# times a view): a layer, an offloaded layer's write-back/prefetch/event nodes, a recomputing
# layer's fixed nodes and each chunk's (the cloned K/V subgraph, staged_act, put_recomputed,
# its wait), the head, a weight-streamed layer's prefetch_weights and its record/wait pairs,
# and grouped-query attention's K,V head expansion. Micro-batches (passes/microbatch.py): the
# split and the final concatenation once, an embedding, head and batch slice per extra
# micro-batch, and nodes that read no tokens (RoPE table slices) once per layer, not per unit.
# tests/test_cost.py checks these against kvc.compiler.lowering; at small batch they bound the step.

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
