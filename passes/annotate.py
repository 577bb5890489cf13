"""annotate: per layer, find the activation that feeds K and V, and the subgraph from it to
the cache write.

For layer i the cache write is `kvc.kv_write(k, v, rt, i)`. The activation is the latest
node that both k and v depend on and that depends on the token inputs: the post-LayerNorm
hidden state in a pre-LN model, the residual stream in OPT's post-LN shape. The K/V subgraph
is every node between {activation, positions} and k, v: projections, bias, reshape, RoPE and
the cos/sin it reads. Nodes that depend on neither (weights, constants) are shared, not part
of it. Any other dependency on the tokens is an error: then K,V could not be rebuilt from
the activation alone.

Records, per layer, in gm.meta["kvc"]["layers"][i] (node names):
  activation, kv_write, k, v (what it writes), kv_read (decode only), kv_slice (topological
  order), positions, first
and tags the nodes: node.meta["kvc"]["role"] in {"activation", "kv_slice"}.
"""
from __future__ import annotations

import torch.fx

from .microbatch import batch_rows
from .nodes import KvcPass, is_op, kvc_meta, layer_nodes, op_arg, placeholder


def _closure(roots: list[torch.fx.Node], step) -> set[torch.fx.Node]:
    """The roots and every node reached from them through `step(node)`."""
    seen, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(step(n))
    return seen


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    return _closure([node], lambda n: n.all_input_nodes)


def _descendants(roots: list[torch.fx.Node]) -> set[torch.fx.Node]:
    return _closure(roots, lambda n: n.users)


def _needed(candidates: set, outputs: list) -> set:
    """The candidates k or v actually reach: drops position-only nodes of other layers."""
    keep, todo = set(), [o for o in outputs if o in candidates]
    while todo:
        n = todo.pop()
        if n in keep:
            continue
        keep.add(n)
        todo.extend(x for x in n.all_input_nodes if x in candidates)
    return keep


class Annotate(KvcPass):
    name = "annotate"

    def run(self, gm: torch.fx.GraphModule) -> bool:
        order = {n: k for k, n in enumerate(gm.graph.nodes)}
        tokens = _descendants([placeholder(gm, "input_ids")])
        positions = placeholder(gm, "positions")
        only_positions = _descendants([positions]) - tokens  # cos/sin tables and the like
        reads = {op_arg(n, "layer"): n for n in gm.graph.nodes if is_op(n, "kv_read")}
        firsts = layer_nodes(gm)
        layers: dict[int, dict] = {}
        for w in [n for n in gm.graph.nodes if is_op(n, "kv_write")]:
            i = op_arg(w, "layer")
            k, v = op_arg(w, "k"), op_arg(w, "v")
            anc_k, anc_v = _ancestors(k), _ancestors(v)
            common = [n for n in anc_k & anc_v if n in tokens]
            if not common:
                raise ValueError(f"layer {i}: K and V share no input activation")
            act = max(common, key=order.__getitem__)
            below = _descendants([act]) | only_positions
            # the positions this unit's K,V read: the input's, or with micro-batches its
            # micro-batch's rows of them (microbatch.batch_rows), which recompute replaces
            pos = next((n for n in anc_k | anc_v if n.op == "call_function" and n.target is batch_rows),
                       positions)
            candidates = ((anc_k | anc_v) & below) - {act, positions, pos}
            kv_slice = sorted(_needed(candidates, [k, v]), key=order.__getitem__)
            for n in kv_slice:
                for inp in n.all_input_nodes:
                    if inp in tokens and inp not in below and inp is not act:
                        raise ValueError(
                            f"layer {i}: {n.name} needs {inp.name}, which is neither the "
                            f"activation {act.name} nor a position; K,V cannot be recomputed")
                kvc_meta(n).update(role="kv_slice", layer=i)
            kvc_meta(act).update(role="activation", layer=i)
            layers[i] = {
                "activation": act.name,
                "kv_write": w.name,
                "k": k.name,
                "v": v.name,
                "kv_read": reads[i].name if i in reads else None,
                "kv_slice": [n.name for n in kv_slice],
                "positions": pos.name,
                "first": firsts[i].name if i in firsts else act.name,
            }
        gm.meta["kvc"]["layers"] = dict(sorted(layers.items()))
        return False  # annotations only: the graph is unchanged
