"""streams: give every node a stream and insert the event record/wait pairs that order them.

Streams: compute (0), prefetch (1, H2D), offload (2, D2H). Copy nodes were tagged by the
passes that made them; every other node computes. The hazards, and the pair each gets
(record on the producer's stream right after it, wait on the consumer's right before it):

- new tokens -> write-back: offload_act / offload_kv read tensors made on compute;
- staged chunk -> its reader: prefetch_act(i, j) -> staged_act(i, j), prefetch_kv(i) -> staged_kv(i);
- write-back -> next step's prefetch of the same layer (the pools' newest row);
- slot reuse: a staging slot is refilled only after the previous layer using it has
  finished reading it (its k_past / v_past concatenations, which copy everything staged).
- weight-streamed layers: prefetch_weights(i) -> the first node of layer i that reads its
  parameters (weights ready), and the last such node -> the next prefetch_weights into the
  same weight slot (weight slot free).

Layers here are units (passes/microbatch.py) except for weights, which are per decoder layer.
Event ids are a fixed function of (layer, kind), the same in prefill and decode graphs, so
a decode step's waits see the prefill's records, and a step's the previous step's. The two
weight kinds get ids after every layer's cache events (`weight_event_id`), and only when the
plan streams weights: a plan that streams none keeps the ids, and the code, it had before.
"""
from __future__ import annotations

import torch.fx

from kvc.ir.plan import Plan
from kvc.ir.ops import COMPUTE, OFFLOAD, PREFETCH

from .nodes import (
    PlanPass,
    readers,
    call,
    is_op,
    kvc_meta,
    offloaded_layers,
    op_arg,
    placeholder,
)

OFFLOADED, SLOT_FREE, KV_READY, ACT_DATA, KV_DATA, ACT_READY = range(6)
STREAM_IDS = {"compute": COMPUTE, "prefetch": PREFETCH, "offload": OFFLOAD}


def events_per_layer(act_chunks: int) -> int:
    return ACT_READY + act_chunks


def event_id(plan: Plan, layer: int, kind: int, chunk: int = 0) -> int:
    """`layer` is a unit (a layer with one micro-batch)."""
    return layer * events_per_layer(plan.act_chunks) + kind + chunk


WEIGHTS_READY, WEIGHT_SLOT_FREE = range(2)  # weight event kinds, in their own block


def weight_event_id(plan: Plan, layer: int, kind: int) -> int:
    """`layer` is a decoder layer: weights are loaded once for all its units."""
    return plan.num_units * events_per_layer(plan.act_chunks) + 2 * layer + kind


def num_events(plan: Plan) -> int:
    weights = 2 * plan.num_layers if plan.streamed_layers else 0
    return plan.num_units * events_per_layer(plan.act_chunks) + weights


def _previous_user(layers: list[int], slot_of, layer: int) -> int:
    """Among `layers` (in order), the one that used `layer`'s slot last, cyclically: across
    steps, the last layers of the previous step."""
    k = layers.index(layer)
    for back in range(1, len(layers) + 1):
        other = layers[(k - back) % len(layers)]
        if slot_of(other) == slot_of(layer):
            return other
    return layer


def previous_weight_slot_user(plan: Plan, layer: int) -> int:
    """The weight-streamed layer that used `layer`'s weight slot last."""
    return _previous_user(list(plan.streamed_layers), plan.weight_slot, layer)


def previous_slot_user(plan: Plan, layer: int) -> int:
    """The offloaded layer that used `layer`'s staging slot last."""
    return _previous_user(offloaded_layers(plan), plan.staging_slot, layer)


class Streams(PlanPass):
    name = "streams"
    after = ("annotate", "offload", "recompute", "prefetch", "weights")

    def run(self, gm: torch.fx.GraphModule) -> bool:
        g, plan = gm.graph, self.plan
        rt = placeholder(gm, "rt")
        order = {n: k for k, n in enumerate(g.nodes)}
        ev = lambda i, kind, j=0: event_id(plan, i, kind, j)  # noqa: E731

        # node names say which event: `wait_slot_free_2` waits until layer 2 has freed its
        # staging slot. Each (kind, event layer, chunk) is recorded and awaited at most once
        # per graph, so fx never adds a counter suffix that would read like a layer number.
        def record_after(node, stream, event, layer):
            with g.inserting_after(node):
                call(g, "record_event", rt, stream=stream, event=event,
                     node_name=f"record_{_event_label(plan, event)}",
                     meta={"role": "event", "layer": layer, "stream": _name(stream)})

        def wait_before(node, stream, event, layer):
            with g.inserting_before(node):
                call(g, "wait_event", rt, stream=stream, event=event,
                     node_name=f"wait_{_event_label(plan, event)}",
                     meta={"role": "event", "layer": layer, "stream": _name(stream)})

        nodes = list(g.nodes)
        by_layer: dict[int, dict[str, list]] = {}
        for n in nodes:
            m = kvc_meta(n)
            m.setdefault("stream", "compute")
            name = next((o for o in ("offload_act", "offload_kv", "prefetch_act", "prefetch_kv",
                                     "staged_act", "staged_kv") if is_op(n, o)), None)
            if name:
                by_layer.setdefault(op_arg(n, "layer"), {}).setdefault(name, []).append(n)
        changed = False
        for i, ops in sorted(by_layer.items()):
            # compute -> write-back, and write-back -> the next step's prefetch of this layer
            for name, kind in (("offload_act", ACT_DATA), ("offload_kv", KV_DATA)):
                for n in ops.get(name, []):
                    src = max((x for x in n.all_input_nodes if x is not rt), key=order.__getitem__)
                    record_after(src, COMPUTE, ev(i, kind), i)
                    wait_before(n, OFFLOAD, ev(i, kind), i)
            offloads = ops.get("offload_act", []) + ops.get("offload_kv", [])
            if offloads:
                record_after(max(offloads, key=order.__getitem__), OFFLOAD, ev(i, OFFLOADED), i)
            # staged copy -> reader
            for n in ops.get("prefetch_act", []):
                j = op_arg(n, "chunk")
                record_after(n, PREFETCH, ev(i, ACT_READY, j), i)
                for r in ops.get("staged_act", []):
                    if op_arg(r, "chunk") == j:
                        wait_before(r, COMPUTE, ev(i, ACT_READY, j), i)
            for n in ops.get("prefetch_kv", []):
                record_after(n, PREFETCH, ev(i, KV_READY), i)
                for r in ops.get("staged_kv", []):
                    wait_before(r, COMPUTE, ev(i, KV_READY), i)
            prefetches = ops.get("prefetch_act", []) + ops.get("prefetch_kv", [])
            if prefetches:
                first = min(prefetches, key=order.__getitem__)
                wait_before(first, PREFETCH, ev(i, OFFLOADED), i)
                wait_before(first, PREFETCH, ev(previous_slot_user(plan, i), SLOT_FREE), i)
            attention = [r for n in ops.get("staged_kv", []) for r in readers(n)]
            if attention:  # the last kernel that reads the slot's K,V
                record_after(max(attention, key=order.__getitem__), COMPUTE, ev(i, SLOT_FREE), i)
            changed = True
        changed |= self._weights(gm, rt, order, record_after, wait_before)
        gm.meta["kvc"]["num_events"] = num_events(plan)
        return changed

    def _weights(self, gm, rt, order, record_after, wait_before) -> bool:
        """weights ready: prefetch_weights(i) -> layer i's first parameter reader; weight slot
        free: its last reader -> the next prefetch_weights into that slot (next step's too)."""
        plan, g = self.plan, gm.graph
        copies = {op_arg(n, "layer"): n for n in g.nodes if is_op(n, "prefetch_weights")}
        layers = gm.meta["kvc"]["layers"]
        nodes = {n.name: n for n in g.nodes}
        for i, copy in sorted(copies.items()):
            ready, free = (weight_event_id(plan, i, k) for k in (WEIGHTS_READY, WEIGHT_SLOT_FREE))
            users = weight_readers(gm, i)  # every unit of the layer (its module calls)
            users += [nodes[layers[u]["first"]] for u in plan.layer_units(i) if u in layers]
            record_after(copy, PREFETCH, ready, i)
            wait_before(min(users, key=order.__getitem__), COMPUTE, ready, i)
            record_after(max(users, key=order.__getitem__), COMPUTE, free, i)
            prev = previous_weight_slot_user(plan, i)
            wait_before(copy, PREFETCH, weight_event_id(plan, prev, WEIGHT_SLOT_FREE), i)
        return bool(copies)


def weight_readers(gm: torch.fx.GraphModule, layer: int) -> list[torch.fx.Node]:
    """The nodes that read layer `layer`'s parameters: its call_module nodes (recompute clones
    included) and the users of its get_attr nodes, looking through views."""
    prefix = f"layers.{layer}."
    out = []
    for n in gm.graph.nodes:
        if not isinstance(n.target, str) or not n.target.startswith(prefix):
            continue
        if n.op == "call_module":
            out.append(n)
        elif n.op == "get_attr":
            out.extend(readers(n))
    return out


_KIND_NAMES = ("offloaded", "slot_free", "kv_ready", "act_data", "kv_data")


def _event_label(plan: Plan, event: int) -> str:
    """`slot_free_2`, `act_ready_1_0` (layer 1, chunk 0), `weights_ready_3`: the inverse of
    event_id and weight_event_id."""
    base = plan.num_units * events_per_layer(plan.act_chunks)
    if event >= base:
        layer, kind = divmod(event - base, 2)
        return f"{('weights_ready', 'weight_slot_free')[kind]}_{layer}"
    layer, kind = divmod(event, events_per_layer(plan.act_chunks))
    if kind >= ACT_READY:
        return f"act_ready_{layer}_{kind - ACT_READY}"
    return f"{_KIND_NAMES[kind]}_{layer}"


def _name(stream: int) -> str:
    return {v: k for k, v in STREAM_IDS.items()}[stream]
