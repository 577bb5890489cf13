"""microbatch: the block schedule (FlexGen's column order) as another lowering of the same graph.

With `plan.micro_batches` m > 1 the step's batch is split into m equal micro-batches and
every decoder layer runs once per micro-batch before the next layer starts, so a layer's
weights are loaded once for all m of them while each micro-batch gets its own cache prefetch,
recompute and write-back. This pass makes that graph from the traced one, first in the
pipeline; every later pass then sees m * L "layers" (units, `Plan` "Units"): unit
u = i * m + k is layer i on micro-batch k.

- `input_ids` is split once (`chunk(m)`); each micro-batch gets its own copy of every node
  that depends on the tokens, on the positions or touches the cache (the cache ops' `layer`
  becomes the unit). Positions are [T], shared by every row, or [b, T] per row for a
  left-padded batch: `batch_rows` gives each micro-batch its rows of them (or all of a [T]),
  a choice made when the step runs.
- Nodes that depend on none of those (weights) stay single and shared.
- Nodes are ordered by (layer, micro-batch): layer i of micro-batch 0, ..., of micro-batch
  m-1, then layer i+1. Shared nodes go first within their layer. Nodes outside any layer
  belong to the layer before them (the embedding to "layer -1", the head to the last).
- The outputs of the m micro-batches are concatenated along the batch.

node.meta["kvc"]["unit"] records the unit of every node in or after a layer, which
`nodes.layer_of` prefers over the module path. With m = 1 the graph is left exactly as traced.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from .nodes import (
    PlanPass,
    kvc_meta,
    module_layer,
    op_arg,
    op_arg_names,
    op_name,
    placeholder,
    set_op_arg,
)


def batch_rows(x: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """Micro-batch k's rows of per-row positions [b, T]; shared positions [T] as they are."""
    return x.chunk(m)[k] if x.dim() == 2 else x


class MicroBatch(PlanPass):
    name = "microbatch"

    def run(self, gm: torch.fx.GraphModule) -> bool:
        m = self.plan.micro_batches
        if "annotate" in gm.meta["kvc"]["passes"]:
            raise RuntimeError("pass 'microbatch' must run before 'annotate': it makes the units")
        gm.meta["kvc"]["micro_batches"] = m
        if m == 1:
            return False
        g = gm.graph
        old = list(g.nodes)
        ids = placeholder(gm, "input_ids")
        pos = placeholder(gm, "positions")
        # rank: the layer a node belongs to, carried forward over nodes outside any layer
        rank, last = {}, -1
        for n in old:
            i = module_layer(n)
            last = i if i is not None else last
            rank[n] = last
        # per micro-batch: whatever depends on the tokens or on a cache op
        cloned: set[torch.fx.Node] = set()
        for n in old:
            if n in (ids, pos) or op_name(n) is not None or any(x in cloned for x in n.all_input_nodes):
                if n.op != "output":
                    cloned.add(n)
        cloned.discard(ids)
        cloned.discard(pos)
        output = next(n for n in old if n.op == "output")

        new_graph = torch.fx.Graph()
        env: list[dict] = [dict() for _ in range(m)]
        shared: dict = {}
        keyed = []
        for o, n in enumerate(old):
            if n.op == "output":
                continue
            if n in cloned:
                keyed.extend(((rank[n], k, o), n, k) for k in range(m))
            elif n.op == "placeholder":  # the signature, in its order, then the split
                keyed.append(((-2, 0, o), n, None))
            else:
                keyed.append(((rank[n], -1, o), n, None))
        keyed.sort(key=lambda t: t[0])

        def lookup(k):
            def f(x):
                if k is not None and x in env[k]:
                    return env[k][x]
                return shared[x]
            return f

        split = False
        for (r, _, _), n, k in keyed:
            if r > -2 and not split:
                chunks = new_graph.call_method("chunk", (shared[ids], m, 0))
                chunks._rename("micro_batches")
                for j in range(m):
                    part = new_graph.call_function(operator.getitem, (chunks, j))
                    part._rename(f"input_ids_mb{j}")
                    env[j][ids] = part
                    rows = new_graph.call_function(batch_rows, (shared[pos], m, j))
                    rows._rename(f"positions_mb{j}")
                    env[j][pos] = rows
                split = True
            if k is None:
                new = new_graph.node_copy(n, lookup(None))
                shared[n] = new
                if r >= 0:
                    kvc_meta(new)["unit"] = r * m
                continue
            new = new_graph.node_copy(n, lookup(k))
            new._rename(f"{n.name}_mb{k}" if k else n.name)
            if op_name(n) is not None and "layer" in op_arg_names(n):
                set_op_arg(new, "layer", op_arg(n, "layer") * m + k)
            new.meta = {key: v for key, v in n.meta.items() if key != "kvc"}
            if r >= 0:  # the embedding belongs to no unit: a unit's first node is in its layer
                kvc_meta(new)["unit"] = r * m + k
            env[k][n] = new
        outs = [env[k][output.args[0]] for k in range(m)]
        cat = new_graph.call_function(torch.cat, (outs, 0))
        cat._rename("micro_batch_outputs")
        new_graph.output(cat)
        gm.graph = new_graph
        return True

