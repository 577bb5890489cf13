"""offload: after each offloaded layer computes, send the new tokens' activation and K,V to the
layer's CPU pools (D2H on the offload stream).

For an offloaded layer, `kv_write(k, v, rt, i)` becomes `offload_kv(k, v, rt, stream, i)`,
and `offload_act(activation, rt, stream, i)` follows the activation when the plan may ever
recompute that layer (otherwise the activation is never read back: its bytes are saved).
Prefill sends the whole prompt; a decode step sends its one token. Resident layers keep
their device-cache `kv_write`.
"""
from __future__ import annotations

import torch.fx

from kvc.ir.ops import OFFLOAD

from .nodes import PlanPass, call, graph_parts, may_recompute


class Offload(PlanPass):
    name = "offload"
    after = ("annotate",)

    def run(self, gm: torch.fx.GraphModule) -> bool:
        g, nodes, rt = graph_parts(gm)
        changed = False
        for i, info in gm.meta["kvc"]["layers"].items():
            if self.plan.resident[i]:
                continue
            w = nodes[info["kv_write"]]
            k, v = w.args[0], w.args[1]
            meta = {"role": "offload", "layer": i, "stream": "offload"}
            with g.inserting_before(w):
                call(g, "offload_kv", k, v, rt, stream=OFFLOAD, layer=i,
                     node_name=f"offload_kv_{i}", meta=meta)
            g.erase_node(w)
            if may_recompute(self.plan, i):
                act = nodes[info["activation"]]
                with g.inserting_after(act):
                    call(g, "offload_act", act, rt, stream=OFFLOAD, layer=i,
                         node_name=f"offload_act_{i}", meta=dict(meta))
            changed = True
        return changed
