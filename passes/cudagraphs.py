"""Piecewise CUDA graphs for the decode step: the host issues a layer in a few calls.

At small batch a decode step is bound by the host, which issues its ~800 nodes one at a time
(docs/BENCHMARKS.md: OPT-6.7B, batch 8, context 512, gpu_resident: 8 ms to issue a step whose
kernels take 6). Most of those nodes have the same shapes at every step: projections, norms,
the MLP, elementwise ops. Only what touches the cache changes from step to step: the kvc ops
(their rows and streams move with the context `s`), the views of the cache they return, and
attention over those views. `partition` cuts the lowered decode graph at exactly those nodes:

- **eager** nodes: every `torch.ops.kvc.*` call, and every node that reads a value whose
  shape depends on `s` (what kv_read / staged_kv / staged_act / recompute_positions return,
  and anything computed from it). Attention (scaled_dot_product_attention, or a function
  marked `kvc_attention`: kvc.models.attend) is the one such op whose output does not depend
  on `s`: its output has the query's shape, so what follows it is static again.
- **static** segments: the runs of other nodes between eager ones. A static node runs in the
  segment right after the last eager node it depends on (so the Q projection joins the K,V
  projections before `kv_write`), but never above a *fence* that preceded it in the
  program: an event recorded or awaited on the compute stream (`is_fence`). A wait may order
  reads without a data edge (a weight-streamed layer's parameters live in a slot that a copy
  fills); a record that runs later than traced holds another stream back (kvpr's one staging
  slot is free only once `record_slot_free` runs: moving the MLP above it cost 20% at
  OPT-6.7B batch 8, H200). Copies issued on other streams are no fence: compute issued before
  them only changes the host's order, not what the GPU waits for. Static nodes never move
  later than traced, so every record still follows what it records.

Each segment is a `Segment` module: on a CUDA device it runs eagerly the first time it sees
its input shapes (warm-up), captures a CUDA graph the second time and replays it from then
on; on a CPU it always runs eagerly, which is how the tests check the partition. The graph
reads fixed addresses: an input produced by another segment's replay is that segment's fixed
output already; any other input (the step's tokens and positions, attention's output) is
copied into the segment's own input buffer first (one small copy). A segment's outputs are
its fixed buffers, overwritten at the next step, so an output that leaves the step (the
logits) or that another stream reads asynchronously (`offload_act` / `offload_kv` on the
write-back stream) is cloned on the compute stream first.

The partition is a function of the lowered graph alone (no Plan, no runtime state), so the
artifact's code and its hash do not change. It is handed its wrapper: `wrap(segment_gm,
escapes)` makes the module a segment runs as (kvc.runtime.segments.SegmentSet.wrap: a CUDA
graph captured at the second call). Without one a segment is its GraphModule, run eagerly:
how the planner counts what the host issues and how CPU tests check the partition.
kvc.api applies it at load time when the Plan says `cuda_graphs` and the device is CUDA.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from kvc.ir.graph import host_kind, op_name, segment_host_kinds
from kvc.ir.ops import COMPUTE, STREAM_NAMES

# kvc ops whose tensors have a shape that moves with the context
_DYNAMIC_RESULTS = frozenset({"kv_read", "kv_mask", "staged_kv", "staged_act", "recompute_positions"})
# ops whose output shape does not depend on their key/value inputs' length
_ATTENTION = frozenset({torch._C._nn.scaled_dot_product_attention,
                        torch.nn.functional.scaled_dot_product_attention})


def is_fence(node: torch.fx.Node) -> bool:
    """An event recorded or awaited on the compute stream: static nodes never move above one."""
    return op_name(node) in ("record_event", "wait_event") and _stream(node) == STREAM_NAMES[COMPUTE]


@dataclass
class Split:
    """What `classify` found: for each node, eager or the segment index it runs in."""

    eager: list[torch.fx.Node]  # in program order
    segment_of: dict[torch.fx.Node, int]  # static node -> j: runs after eager[j - 1], before eager[j]


def classify(graph: torch.fx.Graph) -> Split:
    dynamic: set[torch.fx.Node] = set()  # values whose shape moves with the context
    eager: list[torch.fx.Node] = []
    index: dict[torch.fx.Node, int] = {}  # eager node -> its position in `eager`
    segment_of: dict[torch.fx.Node, int] = {}
    floor = 0  # static nodes may not run above the last fence seen
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        name = op_name(node)
        reads_dynamic = any(a in dynamic for a in node.all_input_nodes)
        if name is not None or reads_dynamic or node.is_impure():
            index[node] = len(eager)
            eager.append(node)
            # attention's output has the query's shape, whatever the cache's length
            query_shaped = ((node.target in _ATTENTION or getattr(node.target, "kvc_attention", False))
                            and node.args[0] not in dynamic)
            if name in _DYNAMIC_RESULTS or (reads_dynamic and not query_shaped):
                dynamic.add(node)
            if is_fence(node):
                floor = len(eager)
            continue
        after = [index[a] + 1 if a in index else segment_of.get(a, 0) for a in node.all_input_nodes]
        segment_of[node] = max([floor, *after])
    return Split(eager, segment_of)


class CudaGraphPartition(PassBase):
    """torch.fx pass form of `partition` (PassManager-compatible); returns a new module."""

    name = "cudagraphs"

    def __init__(self, wrap=None):
        super().__init__()
        self.wrap = wrap

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        return PassResult(partition(gm, self.wrap), True)


def partition(gm: torch.fx.GraphModule, wrap=None) -> torch.fx.GraphModule:
    """The decode graph with each static run moved into a submodule (`graph_<j>`), made by
    `wrap(segment_gm, escapes)` (None: the segment's own GraphModule, eager); a run of views
    only (no kernel to capture) stays in the root graph as it is. The result computes the
    same values with the same ops."""
    split = classify(gm.graph)
    members: dict[int, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node in split.segment_of:
            members.setdefault(split.segment_of[node], []).append(node)

    root = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            env[node] = root.node_copy(node, env.__getitem__)
    segments: dict[str, torch.nn.Module] = {}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for j in range(len(split.eager) + 1):
        if j in members and all(host_kind(n) == "view" for n in members[j]):
            for node in members[j]:  # no kernel to capture (CUDA would warn of an empty graph)
                env[node] = root.node_copy(node, env.__getitem__)
        elif j in members:
            name = f"graph_{j}"
            segments[name] = _emit_segment(gm, root, env, members[j], name, wrap)
        if j < len(split.eager):
            node = split.eager[j]
            env[node] = root.node_copy(node, env.__getitem__)
    root.node_copy(output, env.__getitem__)
    for node in [n for n in root.nodes if n.op == "get_attr" and not n.users]:
        root.erase_node(node)  # read by a segment only
    attrs = {n.target: operator.attrgetter(n.target)(gm) for n in root.nodes if n.op == "get_attr"}
    out = torch.fx.GraphModule({**attrs, **segments}, root, class_name=type(gm).__name__)
    out.meta = dict(gm.meta)
    return out


def _emit_segment(gm, root: torch.fx.Graph, env: dict, nodes: list, name: str, wrap):
    inside = set(nodes)
    sub = torch.fx.Graph()
    local: dict[torch.fx.Node, torch.fx.Node] = {}
    inputs: list[torch.fx.Node] = []
    consts: dict[str, torch.Tensor] = {}

    def arg(a: torch.fx.Node) -> torch.fx.Node:
        if a in local:
            return local[a]
        if a.op == "get_attr":  # parameters and buffers: fixed addresses, read in the graph
            attr = f"c{len(consts)}"
            consts[attr] = operator.attrgetter(a.target)(gm)
            local[a] = sub.get_attr(attr)
        else:
            inputs.append(a)
            local[a] = sub.placeholder(f"in{len(inputs) - 1}")
        return local[a]

    for node in nodes:
        for a in node.all_input_nodes:
            if a not in inside:
                arg(a)
        local[node] = sub.node_copy(node, local.__getitem__)
    leaving = [n for n in nodes if any(u not in inside for u in n.users)]
    sub.output(tuple(local[n] for n in leaving))
    holder = torch.nn.Module()
    for attr, value in consts.items():
        setattr(holder, attr, value)
    escapes = tuple(i for i, n in enumerate(leaving) if any(_escapes_step(u) for u in n.users))
    body = torch.fx.GraphModule(holder, sub, class_name=name)
    if wrap is None:
        body.escapes = escapes
        body.host_kinds = segment_host_kinds(len(escapes))
        segment = body
    else:
        segment = wrap(body, escapes)
    call = root.call_module(name, tuple(env[a] for a in inputs))
    for i, n in enumerate(leaving):
        env[n] = root.call_function(operator.getitem, (call, i))
    return segment


def _escapes_step(user: torch.fx.Node) -> bool:
    """Whether `user` keeps a value past the next replay: the step's output, or a copy on a
    stream other than compute (it reads asynchronously)."""
    if user.op == "output":
        return True
    return op_name(user) is not None and _stream(user) != STREAM_NAMES[COMPUTE]


def _stream(node: torch.fx.Node) -> str:
    """The stream a node runs on, as the streams pass recorded it (compute if none)."""
    return node.meta.get("kvc", {}).get("stream", STREAM_NAMES[COMPUTE])

