"""What every pass needs to read and write graph nodes the same way.

- `kvc_meta(node)` is the dict each pass records what it did in (`node.meta["kvc"]`).
- `is_op(node, name)` matches a call of `torch.ops.kvc.<name>` (packet or overload).
- `layer_nodes(gm)` finds the first node of every decoder layer from `nn_module_stack`.
- `PassBase` subclasses declare `name`; `run_once` makes a second run a no-op, so every
  pass is idempotent, and `gm.meta["kvc"]["passes"]` lists what ran, in order.
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from kvc.cost import HOST_KINDS
from kvc.plan import Plan

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)$")


def kvc_meta(node: torch.fx.Node) -> dict:
    return node.meta.setdefault("kvc", {})


def op_name(node: torch.fx.Node) -> str | None:
    """`kv_read` for a call of torch.ops.kvc.kv_read(.default), else None."""
    if node.op != "call_function":
        return None
    target = node.target
    if getattr(target, "kvc_op", None) is not None:  # the executor's direct call (runtime.ops.DIRECT)
        return target.kvc_op
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.startswith("kvc::"):
        return target._qualified_op_name.split("::", 1)[1]
    return None


def is_op(node: torch.fx.Node, name: str) -> bool:
    return op_name(node) == name


# ops that only make a view (no kernel): the cheapest nodes for the host to issue
VIEW_NAMES = frozenset({"getitem", "getattr", "transpose", "unflatten", "flatten", "view", "reshape",
                        "permute", "unsqueeze", "squeeze", "expand", "narrow", "select", "size",
                        "type_as"})


def host_kind(node: torch.fx.Node) -> str | None:
    """What the host issues for a node, as the cost model's host lane counts it (cost.HOST_KINDS):
    module | op | view | kvc; None for placeholders, attribute reads and the output."""
    if node.op in ("placeholder", "get_attr", "output"):
        return None
    if node.op == "call_module":
        return "module"
    if op_name(node) is not None:
        return "kvc"
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return "view" if name in VIEW_NAMES else "op"


def host_kinds(gm: torch.fx.GraphModule) -> dict[str, int]:
    """A graph's nodes counted by host_kind. A called module that says what the host issues
    for it (`host_kinds`, e.g. a CUDA graph segment of kvc.runtime.cudagraphs) counts as
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


def may_recompute(plan: Plan, layer: int) -> bool:
    """Whether any context of the plan recomputes tokens of this layer (unit)."""
    if plan.resident[layer]:
        return False
    if plan.forced_fraction is not None:
        return plan.forced_fraction > 0
    return any(row[layer] > 0 for row in plan.recompute)


def offloaded_layers(plan: Plan) -> list[int]:
    """The offloaded units, in order (layers when the plan has one micro-batch)."""
    return [i for i, r in enumerate(plan.resident) if not r]


class KvcPass(PassBase):
    """A pass over a kvc GraphModule: runs once, records itself in gm.meta["kvc"]["passes"]."""

    name = "pass"
    after: tuple[str, ...] = ()

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        state = gm.meta.setdefault("kvc", {"passes": []})
        done = state.setdefault("passes", [])
        if self.name in done:
            return PassResult(gm, False)  # idempotent: a second run changes nothing
        missing = [r for r in self.after if r not in done]
        if missing:
            raise RuntimeError(f"pass {self.name!r} needs {missing} to run first")
        modified = self.run(gm)
        done.append(self.name)
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, modified)

    def run(self, gm: torch.fx.GraphModule) -> bool:
        raise NotImplementedError


class PlanPass(KvcPass):
    """A pass that rewrites the graph as the Plan says."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan


def graph_parts(gm: torch.fx.GraphModule):
    """(graph, nodes by name, the `rt` input): what every rewriting pass starts from."""
    return gm.graph, {n.name: n for n in gm.graph.nodes}, placeholder(gm, "rt")
