"""recompute: rebuild K,V of tokens [0, l) from staged activations, by cloning the annotated
K/V subgraph, and assemble the layer's whole K,V in its staging slot.

For every offloaded layer of a decode graph, the cache read `kv_read(rt, i)` is replaced by

    a_j   = staged_act(rt, i, j)            # activation chunk j, [b, n_j, h]
    pos_j = recompute_positions(rt, i, j)   # its absolute positions (if the subgraph reads any)
    k_j, v_j = <the layer's own K/V subgraph on (a_j, pos_j)>   for j < act_chunks
    put_recomputed(k_j, v_j, rt, i, j)      # rows [lo_j, hi_j) of the slot
    put_new(k, v, rt, i)                    # this step's tokens, rows [s, s+T)
    staged_kv(rt, i)                        # rows [0, s+T); [l, s) came by prefetch_kv

so attention reads one buffer and nothing concatenates the cache. No family-specific code:
the clone is whatever the annotate pass found (projection, bias, reshape, RoPE at the right
positions). A layer the plan never recomputes gets no clones.
"""
from __future__ import annotations

import torch.fx

from .nodes import PlanPass, call, graph_parts, kvc_meta, may_recompute


def clone_kv_slice(g: torch.fx.Graph, slice_nodes: list[torch.fx.Node], inputs: dict,
                   k_out: torch.fx.Node, v_out: torch.fx.Node, prefix: str, meta: dict):
    """Copy `slice_nodes` (topologically ordered) at the insert point, reading `inputs`
    (old node -> new node) in place of the activation and positions. Returns new (k, v)."""
    env = dict(inputs)
    for n in slice_nodes:
        new = g.node_copy(n, lambda x: env.get(x, x))
        new._rename(f"{prefix}_{n.name}")
        new.meta = {k: v for k, v in n.meta.items() if k != "kvc"}
        kvc_meta(new).update(meta)
        env[n] = new
    return env[k_out], env[v_out]


class Recompute(PlanPass):
    name = "recompute"
    after = ("annotate", "offload")

    def run(self, gm: torch.fx.GraphModule) -> bool:
        g, nodes, rt = graph_parts(gm)
        changed = False
        for i, info in gm.meta["kvc"]["layers"].items():
            if self.plan.resident[i] or info["kv_read"] is None:
                continue
            read = nodes[info["kv_read"]]
            act, pos = nodes[info["activation"]], nodes[info["positions"]]
            slice_nodes = [nodes[name] for name in info["kv_slice"]]
            w_k, w_v = nodes[info["k"]], nodes[info["v"]]
            reads_positions = any(pos in n.all_input_nodes for n in slice_nodes)
            with g.inserting_before(read):
                if may_recompute(self.plan, i):
                    for j in range(self.plan.act_chunks):
                        meta = {"role": "recompute", "layer": i, "chunk": j}
                        a = call(g, "staged_act", rt, layer=i, chunk=j,
                                 node_name=f"staged_act_{i}_{j}", meta=meta)
                        inputs = {act: a}
                        if reads_positions:  # RoPE families; OPT's K,V ignore positions
                            inputs[pos] = call(g, "recompute_positions", rt, layer=i, chunk=j,
                                               node_name=f"positions_{i}_{j}", meta=meta)
                        k, v = clone_kv_slice(g, slice_nodes, inputs, w_k, w_v,
                                              f"re{i}_{j}", meta)
                        call(g, "put_recomputed", k, v, rt, layer=i, chunk=j,
                             node_name=f"put_recomputed_{i}_{j}", meta=meta)
                call(g, "put_new", w_k, w_v, rt, layer=i, node_name=f"put_new_{i}",
                     meta={"role": "put_new", "layer": i})
                staged = call(g, "staged_kv", rt, layer=i, node_name=f"staged_kv_{i}",
                              meta={"role": "staged_kv", "layer": i})
            read.replace_all_uses_with(staged)
            g.erase_node(read)
            changed = True
        return changed
