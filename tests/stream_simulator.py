"""A happens-before simulator of kvc's streams and events, for the pass tests.

It issues compiled graphs' nodes in host order on CUDA-like streams with vector clocks and
reports every read of a buffer that no event orders after its write (and every write over a
buffer still being read): the races the streams pass must prevent. Buffers: the CPU pools'
rows, the staging slots, and (weight-streamed layers) the two GPU weight slots, which every
node that reads a streamed layer's parameters reads.
"""
from __future__ import annotations

from collections import defaultdict

from kvc.passes.nodes import op_arg, op_name
from kvc.ir.plan import Plan
from kvc.ir.ops import COMPUTE, OFFLOAD, PREFETCH

COPY_OPS = ("offload_act", "offload_kv", "prefetch_act", "prefetch_kv", "prefetch_weights")
VIEW_OPS = {"getitem", "transpose", "permute", "view", "unflatten", "unsqueeze", "squeeze",
            "expand", "narrow", "select", "as_strided"}


def _target_name(n) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")


def is_view(n) -> bool:
    return n.op in ("call_method", "call_function") and _target_name(n) in VIEW_OPS


def sources(n) -> set:
    """What `n` reads, looking through views."""
    out, todo = set(), list(n.all_input_nodes)
    while todo:
        x = todo.pop()
        out.add(x)
        if is_view(x):
            todo.extend(x.all_input_nodes)
    return out


def weight_layers(n) -> set[int]:
    """The layers whose parameters node `n` reads (call_module, or a get_attr through views)."""
    # passes/flatten.py keeps the dotted target in the node's meta
    dotted = lambda x: x.meta.get("kvc", {}).get("target", x.target)  # noqa: E731
    targets = [dotted(n)] if n.op == "call_module" else [
        dotted(x) for x in sources(n) if x.op == "get_attr"]
    out = set()
    for t in targets:
        parts = t.split(".") if isinstance(t, str) else []
        if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
            out.add(int(parts[1]))
    return out


def simulate(plan: Plan, graphs: list, skip: tuple = (None, ())) -> list[str]:
    """Issue the graphs' nodes in host order on CUDA-like streams (vector clocks); return the
    races found. `skip = (graph, names)` drops those nodes of that graph (negative controls)."""
    off = [i for i in range(plan.num_units) if not plan.resident[i]]  # units
    slot = {i: plan.staging_slot(i) for i in off}  # as OffloadedCache._slot
    clock = {s: {} for s in (COMPUTE, PREFETCH, OFFLOAD)}
    events, bad = {}, []
    pool_writes = defaultdict(list)  # (buf, layer) -> [(stamp, run)]
    slot_writes = {}  # (buf, slot, chunk) -> (stamp, layer, run)
    slot_reads = defaultdict(list)  # (buf, slot) -> [stamp]
    slot_owners = defaultdict(list)  # (buf, slot) -> [(stamp, (layer, run))] of every write
    streamed = set(plan.streamed_layers)
    wslot_writes = {}  # weight slot -> (stamp, layer) of its latest fill
    wslot_reads = defaultdict(list)  # weight slot -> [stamp] of every parameter read
    wslot_fills = defaultdict(list)  # weight slot -> [(stamp, layer)] of every fill

    def hb(a, b):
        return b[2].get(a[0], 0) >= a[1]

    for run, gm in enumerate(graphs):
        stamps, staged = {}, {}
        for n in gm.graph.nodes:
            if gm is skip[0] and n.name in skip[1]:
                continue
            name = op_name(n)
            if name == "record_event":
                events[op_arg(n, "event")] = dict(clock[op_arg(n, "stream")])
                continue
            if name == "wait_event":
                c = clock[op_arg(n, "stream")]
                for s, t in events.get(op_arg(n, "event"), {}).items():
                    c[s] = max(c.get(s, 0), t)
                continue
            if n.op in ("placeholder", "get_attr", "output"):
                continue
            s = op_arg(n, "stream") if name in COPY_OPS else COMPUTE
            clock[s][s] = clock[s].get(s, 0) + 1
            st = stamps[n] = (s, clock[s][s], dict(clock[s]))
            where = f"run {run} {n.name}"
            for inp in n.all_input_nodes:
                if inp in staged:
                    slot_reads[staged[inp]].append(st)
                    if is_view(n):  # a view of staged data: its readers read the slot
                        staged[n] = staged[inp]

            def write(buf, i, region):
                key = (buf, slot[i])
                if any(not hb(rd, st) for rd in slot_reads[key]):
                    bad.append(f"{where} refills slot {slot[i]} while it is still read")
                if any(not hb(w, st) for w, who in slot_owners[key] if who != (i, run)):
                    bad.append(f"{where} overwrites slot {slot[i]} before an earlier copy landed")
                slot_owners[key].append((st, (i, run)))
                slot_writes[(buf, slot[i], region)] = (st, i, run)
            for i in weight_layers(n) & streamed if name is None else ():
                ws = plan.weight_slot(i)
                w = wslot_writes.get(ws)
                if w is None or w[1] != i:
                    bad.append(f"{where} reads weight slot {ws} holding another layer's weights")
                elif not hb(w[0], st):
                    bad.append(f"{where} reads layer {i}'s weights before their copy landed")
                wslot_reads[ws].append(st)
            if name == "prefetch_weights":
                i = op_arg(n, "layer")
                ws = plan.weight_slot(i)
                if any(not hb(rd, st) for rd in wslot_reads[ws]):
                    bad.append(f"{where} refills weight slot {ws} while it is still read")
                if any(not hb(w, st) for w, who in wslot_fills[ws] if who != i):
                    bad.append(f"{where} overwrites weight slot {ws} before an earlier copy landed")
                wslot_fills[ws].append((st, i))
                wslot_writes[ws] = (st, i)
            elif name in ("offload_act", "offload_kv"):
                i = op_arg(n, "layer")  # pool rows [s, s+T) of layer i
                for inp in n.all_input_nodes:
                    if inp in stamps and not hb(stamps[inp], st):
                        bad.append(f"{where} reads {inp.name} before compute made it")
                pool_writes[(name[8:], i)].append((st, run))
            elif name in ("prefetch_act", "prefetch_kv"):
                i, buf = op_arg(n, "layer"), name[9:]
                for w, r in pool_writes[(buf, i)]:
                    if r < run and not hb(w, st):
                        bad.append(f"{where} reads pool rows before their write-back landed")
                write(buf, i, op_arg(n, "chunk") if buf == "act" else "tail")
            elif name == "put_recomputed":
                write("kv", op_arg(n, "layer"), op_arg(n, "chunk"))
            elif name == "put_new":
                write("kv", op_arg(n, "layer"), "new")
            elif name in ("staged_act", "staged_kv"):
                i, buf = op_arg(n, "layer"), name[7:]
                if buf == "act":
                    regions = [op_arg(n, "chunk")]
                else:  # rows [0, l) recomputed (if the layer ever is), [l, s) copied, [s, s+T) new
                    recomputes = any(op_name(m) == "put_recomputed" and op_arg(m, "layer") == i
                                     for m in gm.graph.nodes)
                    regions = ["tail", "new"] + (list(range(plan.act_chunks)) if recomputes else [])
                for region in regions:
                    w = slot_writes.get((buf, slot[i], region))
                    if w is None or w[1:] != (i, run):
                        bad.append(f"{where} reads slot {slot[i]} ({region}) holding another "
                                   "layer's or step's data")
                    elif not hb(w[0], st):
                        bad.append(f"{where} reads before its copy ({region}) landed")
                slot_reads[(buf, slot[i])].append(st)
                staged[n] = (buf, slot[i])
    return bad
