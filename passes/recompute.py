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

Layout. The staging slots are token-major (`act_stage[slot]` is [tokens, b, h], `k_stage`
[tokens, b, heads, head_dim]), so `staged_act` is a transposed, non-contiguous [b, n, h]
view and `put_recomputed` writes `k.transpose(0, 1)` into token-major rows. Cloned as traced,
the projection reads that strided view (aten::matmul cannot fold it into one [b*n, h] GEMM:
it runs a bmm of b small GEMMs against the expanded weight, the bias as a separate add, or
a kernel makes the input contiguous first) and returns batch-major K,V, which put_recomputed
then copies with a transposing (elementwise) kernel. A linear map commutes with the batch/token
transpose, `linear(x.transpose(0, 1)) == linear(x).transpose(0, 1)`, so every clone of a
linear node that reads the activation directly (an `nn.Linear` call_module, or
`F.linear` / `torch._C._nn.linear`) reads the contiguous token-major chunk instead,

    re{i}_{j}_tm_act = staged_act_{i}_{j}.transpose(0, 1)     # [n, b, h], contiguous
    re{i}_{j}_tm_<proj> = <proj>(re{i}_{j}_tm_act)             # one plain GEMM, [n, b, out]
    re{i}_{j}_<proj> = re{i}_{j}_tm_<proj>.transpose(0, 1)     # [b, n, out] view, as before

and the rest of the clone sees the shapes it was traced with, in token-major memory: the
head split (`unflatten` / `view` of the last dim) stays a view, elementwise ops (RoPE's
negation and products) follow their inputs' strides, and K,V reach put_recomputed
token-major, where the copy becomes a contiguous memcpy. `torch.cat` is the one op that
does not follow its inputs' strides (it returns contiguous, i.e. batch-major, memory, and
RoPE's sum then mixes layouts and loses its vectorized kernel), so a last-dim cat of values
known to be >= 3-D and token-major (a projection's output through trailing-dim unflatten,
slicing and negation: rotate-half; or products, sums and differences of those with per-token
tables such as RoPE's cos/sin, which do not come from the activation and broadcast over the
batch) is rewritten the same way: `re{i}_{j}_tm_cat` concatenates their `.transpose(0, 1)`
views and `re{i}_{j}_cat` transposes back. Any other cat is cloned as traced. Decided from
node targets only; other readers of the activation keep the [b, n, h] view.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from .nodes import PlanPass, call, graph_parts, kvc_meta, may_recompute

_LINEAR_FUNCTIONS = (torch.nn.functional.linear, torch._C._nn.linear)


def is_linear(gm: torch.fx.GraphModule, n: torch.fx.Node) -> bool:
    """Whether `n` applies a linear map to its first argument (and so commutes with a
    transpose of the leading dims)."""
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), torch.nn.Linear)
    return n.op == "call_function" and n.target in _LINEAR_FUNCTIONS


def _reads_once(n: torch.fx.Node, act: torch.fx.Node) -> bool:
    """`act` is the linear map's input and nothing else (not its weight or bias)."""
    first = n.args[0] if n.args else n.kwargs.get("input")
    return first is act and sum(a is act for a in (*n.args, *n.kwargs.values())) == 1


def _keeps_layout(n: torch.fx.Node, tm: set) -> bool:
    """`n` reads a >= 3-D token-major value (in `tm`) and returns one: an unflatten of a
    trailing dim, slicing (no integer index, no new axis), a negation."""
    if not n.args or n.args[0] not in tm:
        return False
    if n.op == "call_method":
        if n.target == "unflatten":
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            return isinstance(dim, int) and (dim == -1 or dim >= 2)
        return n.target == "neg"
    if n.target is operator.getitem:
        idx = n.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        return all(i is Ellipsis or isinstance(i, slice) for i in idx)
    return n.target in (operator.neg, torch.neg)


_ELEMENTWISE_METHODS = ("mul", "sub", "add")
_ELEMENTWISE_FUNCTIONS = (operator.mul, operator.sub, operator.add, torch.mul, torch.sub, torch.add)


def _elementwise_of_token_major(n: torch.fx.Node, tm: set, from_act: set) -> bool:
    """A product, difference or sum of token-major values (in `tm`) and values that do not
    come from the activation (RoPE's cos/sin rows: per token, broadcast over the batch), at
    least one of them token-major: elementwise ops follow the strides of their operands, and
    the broadcast ones leave the token-major operand to decide."""
    if not ((n.op == "call_method" and n.target in _ELEMENTWISE_METHODS)
            or (n.op == "call_function" and n.target in _ELEMENTWISE_FUNCTIONS)):
        return False
    xs = n.all_input_nodes
    return any(x in tm for x in xs) and all(x in tm or x not in from_act for x in xs)


def _cat_of_token_major(n: torch.fx.Node, tm: set) -> bool:
    """A concatenation along the last dim of >= 3-D token-major values: it commutes with the
    transpose of dims 0 and 1, and cat itself returns contiguous (batch-major) memory."""
    if n.op != "call_function" or n.target not in (torch.cat, torch.concat):
        return False
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    xs = n.args[0]
    return dim == -1 and isinstance(xs, (list, tuple)) and len(xs) > 0 and all(x in tm for x in xs)


def clone_kv_slice(gm: torch.fx.GraphModule, slice_nodes: list[torch.fx.Node], act: torch.fx.Node,
                   inputs: dict, k_out: torch.fx.Node, v_out: torch.fx.Node, prefix: str,
                   meta: dict):
    """Copy `slice_nodes` (topologically ordered) at the insert point, reading `inputs`
    (old node -> new node) in place of the activation `act` and positions. A linear node that
    reads `act` directly, and a last-dim cat of what it feeds, run token-major and are
    transposed back (module docstring). Returns new (k, v)."""
    g = gm.graph
    env = dict(inputs)
    tm: set[torch.fx.Node] = set()  # old nodes whose clone is a >= 3-D token-major value
    tm_of: dict[torch.fx.Node, torch.fx.Node] = {}  # old node -> its clone.transpose(0, 1)

    def copy(n: torch.fx.Node, name: str, reads: dict) -> torch.fx.Node:
        new = g.node_copy(n, lambda x: reads.get(x, x))
        new._rename(name)
        new.meta = {k: v for k, v in n.meta.items() if k != "kvc"}
        kvc_meta(new).update(meta)
        return new

    def transposed(x: torch.fx.Node, name: str, like: torch.fx.Node) -> torch.fx.Node:
        t = g.call_method("transpose", (x, 0, 1))
        t._rename(name)
        t.meta = {k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace")}
        kvc_meta(t).update(meta)
        return t

    # the activation's token-major view is `<prefix>_tm_act`, unless a cloned node is `act`
    act_name = "act" if all(n.name != "act" for n in slice_nodes) else act.name

    def token_major(x: torch.fx.Node) -> torch.fx.Node:
        """`x`'s clone as a token-major [n, b, ...] tensor (a view, made once)."""
        if x not in tm_of:
            tm_of[x] = transposed(env[x], f"{prefix}_tm_{act_name if x is act else x.name}", x)
            kvc_meta(tm_of[x])["layout"] = "token_major"
        return tm_of[x]

    from_act = {act}  # old nodes whose value depends on the activation
    for n in slice_nodes:
        if any(x in from_act for x in n.all_input_nodes):
            from_act.add(n)
        linear = is_linear(gm, n) and _reads_once(n, act)
        if linear or _cat_of_token_major(n, tm):
            xs = [act] if linear else n.args[0]
            tm_of[n] = copy(n, f"{prefix}_tm_{n.name}", {**env, **{x: token_major(x) for x in xs}})
            kvc_meta(tm_of[n])["layout"] = "token_major"
            env[n] = transposed(tm_of[n], f"{prefix}_{n.name}", n)
            tm.add(n)
        else:
            env[n] = copy(n, f"{prefix}_{n.name}", env)
            if _keeps_layout(n, tm) or _elementwise_of_token_major(n, tm, from_act):
                tm.add(n)
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
                        k, v = clone_kv_slice(gm, slice_nodes, act, inputs, w_k, w_v,
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
