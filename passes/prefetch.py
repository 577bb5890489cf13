"""prefetch: issue the H2D copies that fill a layer's staging slot, one layer ahead.

For every offloaded layer i of a decode graph that reads staged data, it inserts

    prefetch_act(rt, stream, i, j)   for each activation chunk j (when the layer recomputes)
    prefetch_kv(rt, stream, i)       the K,V tail [l, s)

on the prefetch stream, activations first so recompute can start while the tail streams in.
They go before the first node of layer `i - plan.lookahead` (the graph's start for the first
layers): with lookahead 1, layer i's copies run while layer i-1 computes; with 0 (kvpr), at
the start of layer i itself.
"""
from __future__ import annotations

import torch.fx

from kvc.ir.ops import PREFETCH

from .nodes import (
    PlanPass,
    call,
    first_compute_node,
    is_op,
    may_recompute,
    op_arg,
    placeholder,
)


class Prefetch(PlanPass):
    name = "prefetch"
    after = ("annotate", "recompute")

    def run(self, gm: torch.fx.GraphModule) -> bool:
        g = gm.graph
        nodes = {n.name: n for n in g.nodes}
        layers = gm.meta["kvc"]["layers"]
        rt = placeholder(gm, "rt")
        staged = {op_arg(n, "layer") for n in g.nodes if is_op(n, "staged_kv")}
        start = first_compute_node(gm)
        changed = False
        for i in sorted(staged):
            ahead = i - self.plan.lookahead
            anchor = nodes[layers[ahead]["first"]] if ahead >= 0 and ahead in layers else start
            meta = {"role": "prefetch", "layer": i, "stream": "prefetch"}
            with g.inserting_before(anchor):
                if may_recompute(self.plan, i):
                    for j in range(self.plan.act_chunks):
                        call(g, "prefetch_act", rt, stream=PREFETCH, layer=i, chunk=j,
                             node_name=f"prefetch_act_{i}_{j}", meta=dict(meta, chunk=j))
                call(g, "prefetch_kv", rt, stream=PREFETCH, layer=i,
                     node_name=f"prefetch_kv_{i}", meta=dict(meta))
            changed = True
        return changed
