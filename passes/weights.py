"""weights: issue the H2D copy of a weight-streamed layer's parameters, one layer ahead.

For every layer the Plan streams the weights of (`Plan.streams_weights`), in prefill and
decode graphs alike, it inserts

    prefetch_weights(rt, stream, i)   the layer's pinned CPU pool -> its GPU weight slot

on the prefetch stream, before the first node of layer i - 1 (the graph's first compute node
for layer 0), and ahead of layer i's own cache prefetches when the prefetch pass put those
at the same place: the copy stream carries the weights first, as cost.simulate assumes.
With micro-batches (passes/microbatch.py), "layer i - 1" is the unit just before layer i's
first unit (the last micro-batch of layer i - 1), and the copy goes ahead of the cache
prefetch of layer i's first unit: one weight copy per layer, for all its micro-batches.
The layer's modules read the slot through their re-pointed parameters (kvc.runtime.weights),
so no node of the layer changes. A plan that streams nothing leaves the graph untouched.
"""
from __future__ import annotations

import torch.fx

from kvc.ir.ops import PREFETCH

from .nodes import PlanPass, call, first_compute_node, is_op, op_arg, placeholder


class Weights(PlanPass):
    name = "weights"
    after = ("annotate", "prefetch")

    def run(self, gm: torch.fx.GraphModule) -> bool:
        streamed = self.plan.streamed_layers
        if not streamed:
            return False
        g = gm.graph
        nodes = {n.name: n for n in g.nodes}
        order = {n: k for k, n in enumerate(g.nodes)}
        layers = gm.meta["kvc"]["layers"]
        rt = placeholder(gm, "rt")
        start = first_compute_node(gm)
        for i in streamed:
            first_unit = self.plan.layer_units(i)[0]
            ahead = first_unit - 1
            anchor = nodes[layers[ahead]["first"]] if ahead >= 0 and ahead in layers else start
            own = [n for n in g.nodes if (is_op(n, "prefetch_act") or is_op(n, "prefetch_kv"))
                   and op_arg(n, "layer") == first_unit]
            if own and order[own[0]] < order[anchor]:
                anchor = own[0]
            with g.inserting_before(anchor):
                call(g, "prefetch_weights", rt, stream=PREFETCH, layer=i,
                     node_name=f"prefetch_weights_{i}",
                     meta={"role": "prefetch_weights", "layer": i, "stream": "prefetch"})
        return True
