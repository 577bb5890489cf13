"""handoff: issue each unit's CPU attention hand-off (`cpu_attn_begin`) as early as its query
allows, ahead of the layer's copies and write-backs.

The CPU lane (issue 17) is on a unit's critical path: its worker starts only once the host
has handed it the query, and the host blocks in the attention node until the worker is done.
Whatever the host issues between that attention node and the next unit's `cpu_attn_begin`
is time the CPU lane sits idle. As traced, that is the next layer's prefetch nodes (placed
before its first node by the prefetch pass), its write-back nodes and the K,V projection:
0.8 ms of host time per unit at llama-3-8b b32 s2048 on the H200 (tools/lane_timing_probe.py,
2026-11-29), against a 2.7 ms CPU part. This pass moves `cpu_attn_begin` and the nodes its
query needs that come after the last fence (the input norm, the Q projection, RoPE) up to
right after what they read, so the host hands the query over first and issues the rest while
the CPU attends.

What may not be crossed (fences): a node of the query's past that touches the runtime (a
cache verb such as a resident layer's kv_read, which reads what a kv_write wrote without a
data edge between them; the previous layer's attention, which merges the lane's partial); an
event awaited on the compute stream (a weight-streamed layer's parameters are ready only
after it); and one recorded there that another stream's copy waits for before it may start:
a staging slot's or a weight slot's release (moving kernels above it would start the next
copies later, as the partition's rule says). Crossing anything else is safe: prefetch and
write-back nodes run on other streams and read no value of the query's path; the
write-back's own records (new activations, new K,V) follow a few more small kernels, and
nothing waits for them within the step; the worker reads only cached rows below s, whose
write-backs were issued in earlier steps (the new row's write-back, which may now be issued
after the hand-off, is never read by the CPU).
A plan without the lane (Plan.cpu_lane false: no unit ever attends on the CPU) keeps the
traced order, so do graphs without `cpu_attn_begin`.
"""
from __future__ import annotations

import torch.fx

from .nodes import PlanPass, is_op, kvc_meta, op_arg, op_name
from .streams import ACT_DATA, KV_DATA, events_per_layer


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n in seen or n.op == "placeholder":
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _touches_runtime(n: torch.fx.Node) -> bool:
    """A kvc op, or any call handed the runtime (`rt`): its effects are not data edges."""
    return op_name(n) is not None or any(a.op == "placeholder" and a.name == "rt" for a in n.all_input_nodes)


class Handoff(PlanPass):
    name = "handoff"
    after = ("streams",)

    def _fence(self, n: torch.fx.Node) -> bool:
        """An event node on the compute stream that the hand-off may not move above."""
        if kvc_meta(n).get("stream") != "compute":
            return False
        if is_op(n, "wait_event"):
            return True
        if not is_op(n, "record_event"):
            return False
        per, event = events_per_layer(self.plan.act_chunks), op_arg(n, "event")
        write_back = event < self.plan.num_units * per and event % per in (ACT_DATA, KV_DATA)
        return not write_back

    def run(self, gm: torch.fx.GraphModule) -> bool:
        if not self.plan.cpu_lane:  # no unit attends on the CPU: the traced order stays
            return False
        g = gm.graph
        changed = False
        for begin in [n for n in g.nodes if is_op(n, "cpu_attn_begin")]:
            order = {n: k for k, n in enumerate(g.nodes)}
            above = _ancestors(begin)
            fence = max((order[n] for n in g.nodes if order[n] < order[begin] and self._fence(n)),
                        default=-1)
            # nor any node of the query's past that touches the runtime (a cache verb, the
            # previous layer's attention): its order with the nodes around it is its meaning
            fence = max([fence] + [order[n] for n in above if _touches_runtime(n)])
            cone = {n for n in above if order[n] > fence}
            cone.add(begin)
            # right after the latest value the cone reads from outside it (or the fence)
            anchor = max((order[i] for n in cone for i in n.all_input_nodes if i not in cone),
                         default=-1)
            anchor = max(anchor, fence)
            moving = sorted((n for n in cone if order[n] > anchor), key=order.__getitem__)
            if anchor < 0:
                continue  # nothing to hang it after (cannot happen in a traced step)
            nodes = list(g.nodes)
            cursor = nodes[anchor]
            if [nodes[k] for k in range(anchor + 1, anchor + 1 + len(moving))] == moving:
                continue  # already in place
            for n in moving:
                cursor.append(n)
                cursor = n
            changed = True
        return changed
