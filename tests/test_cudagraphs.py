"""Piecewise CUDA graphs (kvc.passes.cudagraphs) on the CPU: the partition of every decode
graph computes exactly what the unpartitioned graph does (its segments run eagerly here; the
GPU tests capture and replay them), its cut points are where the docstring says, and the cost
model counts what the host issues for it. Plan and config carry the switch."""
from __future__ import annotations

import dataclasses
from dataclasses import replace

import numpy as np
import pytest
import torch
from kvc.ir.graph import HOST_KINDS, host_kinds
from kvc.passes.nodes import op_name
from kvc_fixtures import hw, perturb_small_params

from kvc.planner import cost
from kvc.config import load_config
from kvc.compiler.lowering import lower
from kvc.models import build_model, preset
from kvc.runtime.reference import ReferenceDecoder
from kvc.models import PRESETS
from kvc.ir.modes import NAMES as MODES
from kvc.ir.plan import Plan, forced_plan, weights_for_fraction
from kvc.ir.request import PlanRequest
from kvc.passes.cudagraphs import classify, is_fence, partition
from kvc.api import assemble
from kvc.planner.scheduler import make_plan, predict

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "tiny-opt": preset("tiny-opt"),
    "tiny-opt-post-ln": replace(preset("tiny-opt"), do_layer_norm_before=False),
    "tiny-llama": preset("tiny-llama"),
    "tiny-llama-gqa": preset("tiny-llama-gqa"),
}


def _model(name):
    spec = VARIANTS[name]
    return spec, perturb_small_params(build_model(spec, "cpu", torch.float32, seed=0))


def _plan(mode, layers, micro_batches=1, streamed=0.0, chunks=2, prompt=7, gen=6) -> Plan:
    fraction = 0.5 if mode in ("kvpr", "pipelined") else 0.0
    plan = forced_plan(mode, layers, prompt, gen, 64, fraction, act_chunks=chunks,
                       micro_batches=micro_batches)
    return replace(plan, weights_streamed=weights_for_fraction(layers, streamed))


def _generate(name, plan, graphs: bool, batch=2, prompt=7, gen=6):
    spec, m = _model(name)
    cm = assemble(lower(m, plan), plan, spec, torch.float32, torch.device("cpu"), cuda_graphs=graphs)
    ids = torch.randint(0, spec.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(5))
    try:
        return ids, cm.generate(ids, gen, return_logits=True), cm
    finally:
        cm.close()


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
def test_partitioned_step_computes_exactly_what_the_graph_does(name, mode):
    plan = _plan(mode, VARIANTS[name].num_layers)
    ids, (tokens, logits), cm = _generate(name, plan, graphs=True)
    assert cm.graphs is not None and cm.graphs.segments  # the partition ran
    _, (ref_tokens, ref_logits), _ = _generate(name, plan, graphs=False)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(logits, ref_logits)  # same ops in an order the data allows: bit-equal
    spec, m = _model(name)
    assert torch.equal(tokens, ReferenceDecoder(m, spec).generate(ids, 6))


@pytest.mark.parametrize("mode,micro_batches,streamed", [("full_offload", 2, 1.0), ("pipelined", 2, 0.5),
                                                         ("kvpr", 1, 1.0)])
def test_partition_of_the_block_schedule_and_streamed_weights(mode, micro_batches, streamed):
    plan = _plan(mode, 2, micro_batches=micro_batches, streamed=streamed)
    _, (tokens, logits), _ = _generate("tiny-llama", plan, graphs=True, batch=4)
    _, (ref_tokens, ref_logits), _ = _generate("tiny-llama", plan, graphs=False, batch=4)
    assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)


def _lowered(name, plan):
    return lower(_model(name)[1], plan).decode


def test_a_resident_layer_is_one_segment_and_its_cache_ops():
    """gpu_resident: the embedding and each layer's projections run in one segment, the Q
    projection joining K,V before kv_write; the rest is the cache ops, their views and attention
    (kvc.models.attend, with the padding mask kv_mask returns, and the CPU lane's hand-off)."""
    spec = VARIANTS["tiny-opt"]
    gm = _lowered("tiny-opt", _plan("gpu_resident", spec.num_layers))
    split = classify(gm.graph)
    assert len(set(split.segment_of.values())) == spec.num_layers + 1
    eager = [op_name(n) or getattr(n.target, "__name__", n.target) for n in split.eager]
    per_layer = ["kv_write", "cpu_attn_begin", "kv_read", "getitem", "transpose", "getitem",
                 "transpose", "kv_mask", "attend"]
    assert sorted(eager) == sorted(per_layer * spec.num_layers)
    q_proj = next(n for n in gm.graph.nodes if n.name == "layers_0_self_attn_q_proj")
    first_write = next(n for n in split.eager if op_name(n) == "kv_write")
    assert split.segment_of[q_proj] <= split.eager.index(first_write)


@pytest.mark.parametrize("mode,streamed", [("pipelined", 1.0), ("kvpr", 0.0), ("full_offload", 0.5)])
def test_no_node_moves_above_a_compute_event(mode, streamed):
    """A weight-streamed layer's parameters are filled by a copy its `wait_weights_ready`
    orders, with no data edge to the readers; and a record run later than traced holds
    another stream back (kvpr's one staging slot). No node after such a fence in the program
    may run in a segment before it."""
    gm = _lowered("tiny-llama", _plan(mode, 2, streamed=streamed))
    split = classify(gm.graph)
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    fences = [n for n in split.eager if is_fence(n)]
    assert any(n.name.startswith("wait_weights_ready") for n in fences) == (streamed > 0)
    assert any(n.name.startswith("record_slot_free") for n in fences)
    for fence in fences:
        at = split.eager.index(fence)
        later = [n for n in split.segment_of if order[n] > order[fence]]
        assert all(split.segment_of[n] > at for n in later), fence.name


def test_values_that_leave_the_step_or_the_stream_are_cloned():
    """The logits leave the step; offload_act/offload_kv read on the write-back stream after
    the compute stream has moved on: those segment outputs are cloned after a replay."""
    spec = VARIANTS["tiny-llama"]
    for mode, per_layer in (("gpu_resident", 0), ("full_offload", 2), ("pipelined", 3)):
        part = partition(_lowered("tiny-llama", _plan(mode, spec.num_layers)))
        segments = [m for name, m in part.named_children() if name.startswith("graph_")]
        assert sum(len(s.escapes) for s in segments) == 1 + per_layer * spec.num_layers, mode


def test_graphed_host_nodes_match_the_partition():
    """The graphed host rows (kvc.compiler.host_counts, from the partitioned probe graphs)
    count what the host issues for the partitioned step, as the eager rows do for the graph
    itself (tests/test_cost.py)."""
    for name in ("tiny-opt", "tiny-llama", "tiny-llama-gqa"):
        spec = dataclasses.replace(PRESETS[name], num_layers=3)
        for mode, chunks, m, w in (("gpu_resident", 1, 1, 0), ("full_offload", 1, 1, 0), ("kvpr", 1, 1, 0),
                                   ("pipelined", 3, 1, 0), ("pipelined", 2, 2, 0), ("full_offload", 1, 2, 1.0),
                                   ("pipelined", 2, 1, 0.5)):
            plan = _plan(mode, 3, micro_batches=m, streamed=w, chunks=chunks, prompt=8, gen=8)
            gm = lower(build_model(spec, "meta", "float16"), plan).decode
            rec = [mode in ("kvpr", "pipelined")] * (3 * m)
            got = host_kinds(partition(gm))
            want = cost.host_node_kinds(spec, plan.resident, rec, plan.act_chunks, plan.weights_streamed,
                                        m, graphed=True)
            assert list(want) == [got[k] for k in HOST_KINDS], (name, mode, m, w)


def test_plan_and_config_carry_the_switch():
    model = {"model": {"preset": "tiny-opt"}}
    assert load_config(model).schedule.cuda_graphs is True
    assert load_config(model, ["schedule.cuda_graphs=false"]).schedule.cuda_graphs is False
    plan = replace(_plan("pipelined", 2), cuda_graphs=True)
    assert Plan.from_json(plan.to_json()) == plan
    old = replace(plan, cuda_graphs=False).to_json()
    assert "cuda_graphs" not in old  # a manifest of a plan without graphs reads as before
    assert Plan.from_json(old).cuda_graphs is False


def test_cpu_runs_the_graph_as_traced_unless_asked():
    plan = replace(_plan("gpu_resident", 2), cuda_graphs=True)
    spec, m = _model("tiny-llama")
    cm = assemble(lower(m, plan), plan, spec, torch.float32, torch.device("cpu"))
    assert cm.graphs is None  # no CUDA: nothing to capture


def test_the_host_lane_counts_graph_calls_on_a_gpu():
    """At small batch a gpu_resident step is host-bound; as graphs it issues a few calls per
    layer, so the predicted host time falls, and on a CPU machine nothing changes."""
    spec = PRESETS["opt-6.7b"]
    h200 = hw("h200-pcie5")
    kw = {"batch_size": 8, "prompt_len": 512, "gen_len": 32, "dtype": "float16", "mode": "gpu_resident"}
    eager = predict(spec, h200, make_plan(spec, h200, PlanRequest(**kw)), 512, 8, "float16")
    graphed = predict(spec, h200, make_plan(spec, h200, PlanRequest(cuda_graphs=True, **kw)), 512, 8, "float16")
    assert graphed["host_ms"] < eager["host_ms"] / 2
    assert graphed["predicted_step_ms"] <= eager["predicted_step_ms"]
    kinds = cost.host_node_kinds(spec, [True] * spec.num_layers, [False] * spec.num_layers, 1, graphed=True)
    assert graphed["host_ms"] == pytest.approx(cost.host_ms(h200, kinds, spec))
    cpu = hw("cpu", gpu_mem_gb=64.0)
    a = predict(spec, cpu, make_plan(spec, cpu, PlanRequest(**kw)), 512, 8, "float16")["host_ms"]
    b = predict(spec, cpu, make_plan(spec, cpu, PlanRequest(cuda_graphs=True, **kw)), 512, 8, "float16")["host_ms"]
    assert a == b
    assert np.all(np.asarray(kinds) >= 0)
