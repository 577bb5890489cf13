"""The streams pass: the record/wait pairs per layer, and (with a small happens-before
simulator of CUDA streams and events) that the stream schedule has no race: no staged buffer
is read before its copy lands or refilled while a layer still reads it, no pool row is
prefetched before its write-back lands, and no write-back reads a tensor before compute made
it. Each record/wait the pass inserts is shown to be necessary.
"""
# ruff: noqa: F405  (names come from pass_fixtures, shared by the three pass test files)
from __future__ import annotations

import pytest

from pass_fixtures import *  # noqa: F401,F403  (the toy decoder, plans and graph readers)

pytestmark = pytest.mark.usefixtures("one_thread")

def test_streams_pairs_per_layer():
    plan = plan_for(chunks=2)
    m = tiny("tiny-llama")
    gm = compiled(m, plan)
    nodes = named(gm)
    info = layers_meta(gm)
    for i in range(3):
        for j in range(2):
            ev = event_id(plan, i, ACT_READY, j)
            assert event_args(nodes[f"prefetch_act_{i}_{j}"].next) == (PREFETCH, ev)
            assert is_op(nodes[f"staged_act_{i}_{j}"].prev, "wait_event")
            assert event_args(nodes[f"staged_act_{i}_{j}"].prev) == (COMPUTE, ev)
        assert event_args(nodes[f"prefetch_kv_{i}"].next) == (PREFETCH, event_id(plan, i, KV_READY))
        assert event_args(nodes[f"staged_kv_{i}"].prev) == (COMPUTE, event_id(plan, i, KV_READY))
        # before the layer's first copy: its newest pool rows landed, and its slot is free
        first = nodes[f"prefetch_act_{i}_0"]
        prev_user = {0: 2, 1: 1, 2: 0}[i]  # 3 offloaded layers, 2 slots, cyclic across steps
        assert [event_args(first.prev.prev), event_args(first.prev)] == [
            (PREFETCH, event_id(plan, i, OFFLOADED)), (PREFETCH, event_id(plan, prev_user, SLOT_FREE))]
        # the slot is free once attention (reached through views of staged_kv) has read it
        (attn,) = [n for n in gm.graph.nodes if n.op == "call_function" and layer_of(n) == i
                   and getattr(n.target, "kvc_attention", False)]  # kvc.models.attend
        assert nodes[f"staged_kv_{i}"] in sources(attn)
        rec = attn.next
        assert is_op(rec, "record_event") and event_args(rec) == (COMPUTE, event_id(plan, i, SLOT_FREE))
        # write-back: record on compute after the producer, wait on offload before the copy
        act = nodes[info[i]["activation"]]
        assert [event_args(act.next), event_args(act.next.next)] == [
            (COMPUTE, event_id(plan, i, ACT_DATA)), (OFFLOAD, event_id(plan, i, ACT_DATA))]
        assert act.next.next.next.name == f"offload_act_{i}"
        kv = nodes[f"offload_kv_{i}"]
        assert event_args(kv.prev) == (OFFLOAD, event_id(plan, i, KV_DATA))
        assert event_args(kv.next) == (OFFLOAD, event_id(plan, i, OFFLOADED))
    ids = [op_arg(n, "event") for n in gm.graph.nodes if is_event(n)]
    assert 0 <= min(ids) and max(ids) < num_events(plan) == gm.meta["kvc"]["num_events"]


def test_streams_tag_every_node():
    gm = compiled(tiny("tiny-opt"), plan_for())
    for n in gm.graph.nodes:
        stream = n.meta["kvc"]["stream"]
        if op_name(n) in COPY_OPS or is_event(n):
            assert {"compute": COMPUTE, "prefetch": PREFETCH, "offload": OFFLOAD}[stream] == op_arg(n, "stream")
        else:
            assert stream == "compute", n.name


# --- the happens-before simulator (tests/stream_simulator.py) on real schedules -------------

def steps(model, plan, decode_steps=4):
    pre, dec = compiled(model, plan, prefill=True), compiled(model, plan)
    return pre, dec, [pre] + [dec] * decode_steps


SCHEDULES = [("pipelined", 0.5, 2, None), ("pipelined", 1.0, 3, None), ("pipelined", 0.0, 2, None),
             ("kvpr", 0.5, 1, None), ("full_offload", 0.3, 1, None),
             ("pipelined", 0.5, 2, (False, True, False)), ("kvpr", 0.5, 1, (True, False, False)),
             ("pipelined", 0.5, 2, (True, False, True))]


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("mode,fraction,chunks,resident", SCHEDULES)
def test_streams_schedule_has_no_race(layers, mode, fraction, chunks, resident):
    if resident is not None and layers == 2:
        resident = resident[:2]
    plan = plan_for(mode, layers, fraction, chunks, resident)
    _, _, graphs = steps(ToyDecoder(layers=layers), plan)
    assert simulate(plan, graphs) == []


@pytest.mark.parametrize("layers,fraction", [(2, 0.5), (2, 0.0), (3, 0.5)])
def test_every_event_node_is_needed(layers, fraction):
    """Negative control: drop any one record or wait from the decode graph and the simulator
    finds a race, so it would catch a missing pair, and the pass inserts none in vain.

    One exception, with 3 offloaded layers: layer 1 is the only user of slot 1, and the
    prefetch stream already waited (for layer 0's copies, earlier in the same step) until
    layer 2 freed slot 0 in the previous step, which is after layer 1 freed slot 1 there:
    wait_slot_free_1 (and so record_slot_free_1, its only waiter) is implied. Harmless, and
    kept: the rule is simpler than the exception."""
    plan = plan_for("pipelined", layers, fraction, 2)
    _, dec, graphs = steps(tiny("tiny-llama", layers=layers), plan)
    assert simulate(plan, graphs) == []
    implied = {"wait_slot_free_1", "record_slot_free_1"} if layers == 3 else set()
    for n in [n for n in dec.graph.nodes if is_event(n)]:
        found = simulate(plan, graphs, skip=(dec, {n.name}))
        assert bool(found) != (n.name in implied), f"{n.name}: {found}"


def test_simulator_sees_a_late_prefetch():
    """A prefetch issued after its reader (here: moved to the graph's end) is a race."""
    plan = plan_for("pipelined", 3, 0.5, 1)
    _, dec, graphs = steps(ToyDecoder(), plan)
    block = [n for n in dec.graph.nodes if n.meta.get("kvc", {}).get("layer") == 1
             and n.meta["kvc"].get("stream") == "prefetch"]
    out = next(n for n in dec.graph.nodes if n.op == "output")
    for n in block:
        out.prepend(n)
    assert any("landed" in p or "another layer" in p for p in simulate(plan, graphs))


# === the pipeline: order, idempotence, prerequisites, DCE, readable code =====================

