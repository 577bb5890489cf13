"""The host lane: nodes of the lowered decode graph the host issues one at a time, by kind
(kvc.ir.graph.HOST_KINDS: module calls, aten ops, views, kvc custom ops, CUDA graph
replays), and the time it takes to issue them. At small batch they bound the step.

The counts per feature of a plan (a unit, an offloaded or recomputing unit, a chunk, a
streamed layer, micro-batches, the head) are read off the model's own lowered graph
(kvc.compiler.host_counts), once per model structure.
"""
from __future__ import annotations

import numpy as np

from kvc.compiler.host_counts import features, host_rows
from kvc.hardware import HardwareConfig
from kvc.ir.graph import HOST_KINDS  # noqa: F401  (cost.HOST_KINDS)
from kvc.models import costs as family_costs
from kvc.models.spec import ModelSpec


def host_node_kinds(spec: ModelSpec, resident, recomputes, act_chunks: int, streamed=None,
                    micro_batches: int = 1, graphed: bool = False) -> np.ndarray:
    """Nodes per decode step by kind ([len(HOST_KINDS)]); `resident` and `recomputes` are
    per-unit booleans (arrays), `streamed` per layer (weights). `graphed`: the step runs as
    piecewise CUDA graphs (kvc.passes.cudagraphs)."""
    f = features(resident, recomputes, act_chunks, streamed, micro_batches)
    rows = host_rows(spec, graphed, micro_batches > 1)
    return f[:len(rows)] @ rows


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
