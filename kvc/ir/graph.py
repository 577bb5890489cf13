"""Reading and writing kvc graphs: the op vocabulary seen from torch.fx.

Every layer that looks at a lowered graph asks here: the passes (which node is which kvc op,
its arguments by schema name, which decoder layer made it), the CUDA-graph partition, the
executor (`direct_calls`) and the planner's host lane (`host_kind`: what the host issues for
a node). One list of view ops serves them all.
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx

from kvc.ir.ops import DIRECT

# what the host issues per node, as the planner's host lane counts it
HOST_KINDS = ("module", "op", "view", "kvc", "graph")

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)$")


def kvc_meta(node: torch.fx.Node) -> dict:
    return node.meta.setdefault("kvc", {})


def op_name(node: torch.fx.Node) -> str | None:
    """`kv_read` for a call of torch.ops.kvc.kv_read(.default), else None."""
    if node.op != "call_function":
        return None
    target = node.target
    if getattr(target, "kvc_op", None) is not None:  # the executor's direct call (kvc.ir.ops.DIRECT)
        return target.kvc_op
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.startswith("kvc::"):
        return target._qualified_op_name.split("::", 1)[1]
    return None


def is_op(node: torch.fx.Node, name: str) -> bool:
    return op_name(node) == name


# ops that make a view of their input (no kernel, in the graphs kvc lowers): the cheapest
# nodes for the host to issue, and what a reader of a buffer is looked for through
VIEW_NAMES = frozenset({"getitem", "getattr", "transpose", "unflatten", "flatten", "view", "reshape",
                        "permute", "unsqueeze", "squeeze", "expand", "narrow", "select", "size",
                        "type_as", "as_strided"})


def target_name(node: torch.fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def is_view(node: torch.fx.Node) -> bool:
    return node.op in ("call_method", "call_function") and target_name(node) in VIEW_NAMES


def readers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that read `node`'s data: its users, looking through views."""
    out, todo = [], list(node.users)
    while todo:
        u = todo.pop()
        if is_view(u):
            todo.extend(u.users)
        else:
            out.append(u)
    return out


def host_kind(node: torch.fx.Node) -> str | None:
    """What the host issues for a node, as the cost model's host lane counts it (cost.HOST_KINDS):
    module | op | view | kvc; None for placeholders, attribute reads and the output."""
    if node.op in ("placeholder", "get_attr", "output"):
        return None
    if node.op == "call_module":
        return "module"
    if op_name(node) is not None:
        return "kvc"
    return "view" if target_name(node) in VIEW_NAMES else "op"


def segment_host_kinds(escapes: int) -> dict[str, int]:
    """What the host issues per call of a CUDA graph segment: one replay with its input
    copies, and a clone per output that escapes the replay."""
    return {"graph": 1, "op": escapes}


def host_kinds(gm: torch.fx.GraphModule) -> dict[str, int]:
    """A graph's nodes counted by host_kind. A called module that says what the host issues
    for it (`host_kinds`, e.g. a CUDA graph segment of the CUDA-graph partition, passes/cudagraphs.py) counts as
    that, and taking an item of its tuple output as nothing."""
    def issued(node):
        return getattr(gm.get_submodule(node.target), "host_kinds", None) if node.op == "call_module" else None

    out = dict.fromkeys(HOST_KINDS, 0)
    for n in gm.graph.nodes:
        if issued(n) is not None:
            for k, count in issued(n).items():
                out[k] += count
            continue
        if n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node) and issued(n.args[0]) is not None:
            continue
        k = host_kind(n)
        if k is not None:
            out[k] += 1
    return out


def op_arg_names(node: torch.fx.Node) -> list[str]:
    """The argument names of a kvc op's schema, in order."""
    return [a.name for a in getattr(torch.ops.kvc, op_name(node)).default._schema.arguments]


def op_arg(node: torch.fx.Node, name: str):
    """An argument of a kvc op by its schema name, whether passed by position or keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[op_arg_names(node).index(name)]


def set_op_arg(node: torch.fx.Node, name: str, value) -> None:
    """Replace an argument of a kvc op, where op_arg finds it."""
    if name in node.kwargs:
        node.kwargs = {**node.kwargs, name: value}
    else:
        args = list(node.args)
        args[op_arg_names(node).index(name)] = value
        node.args = tuple(args)


def call(graph: torch.fx.Graph, name: str, *args, node_name: str | None = None, meta=None, **kwargs):
    """Insert `torch.ops.kvc.<name>(*args, **kwargs)` at the graph's insert point."""
    node = graph.call_function(getattr(torch.ops.kvc, name), tuple(args), kwargs)
    if node_name:
        node._rename(node_name)
    kvc_meta(node).update(meta or {})
    return node


def placeholder(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.target == name:
            return n
    raise ValueError(f"the traced graph has no input {name!r}")


def layer_of(node: torch.fx.Node) -> int | None:
    """The unit a node computes for (the microbatch pass records it), else its decoder layer."""
    unit = node.meta.get("kvc", {}).get("unit")
    return unit if unit is not None else module_layer(node)


def module_layer(node: torch.fx.Node) -> int | None:
    """The decoder layer whose module made this node (from `nn_module_stack`), if any."""
    stack = node.meta.get("nn_module_stack") or {}
    for key in reversed(list(stack)):
        path = stack[key][0] if isinstance(stack[key], tuple) else key
        m = _LAYER_RE.search(path)
        if m:
            return int(m.group(1))
    return None


def layer_nodes(gm: torch.fx.GraphModule) -> dict[int, torch.fx.Node]:
    """The first node of each decoder layer (unit), in graph order."""
    first: dict[int, torch.fx.Node] = {}
    for n in gm.graph.nodes:
        i = layer_of(n)
        if i is not None and i not in first:
            first[i] = n
    return first


def first_compute_node(gm: torch.fx.GraphModule) -> torch.fx.Node:
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "get_attr"):
            return n
    raise ValueError("empty graph")




def direct_calls(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm` whose torch.ops.kvc calls are the DIRECT functions (kvc.ir.ops: the same
    verbs without the dispatcher); the lowered graph, whose code the artifact hashes, is left
    as it is."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for node in graph.nodes:
        name = op_name(node)
        if name is not None:
            node.target = DIRECT[name]
    copy = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta = dict(gm.meta)
    return copy
