"""The block schedule (issue 6): `workload.num_gpu_batches` micro-batches per step, each layer
run once per micro-batch before the next (units, kvc.ir.plan "Units"), through the microbatch
pass and the same passes, events and runtime.

CPU only: parity with the reference decoder, block order in the graph, one weight copy per
layer for all micro-batches, the race simulator on unit schedules, the host-node count, the
scheduler's unit LP and memory terms, config and bad input.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from kvc.ir.graph import HOST_KINDS, host_kinds
from kvc.passes.nodes import is_op, layer_of, op_arg
from kvc.passes.pipeline import run_pipeline
from stream_simulator import simulate
from kvc_fixtures import hw
from test_weights import model

import kvc
from kvc.planner import cost
from kvc.errors import KvcError
from kvc.compiler.lowering import lower
from kvc.models import build_model, preset
from kvc.runtime.reference import ReferenceDecoder
from kvc.models import PRESETS
from kvc.ir.modes import NAMES as MODES
from kvc.ir.plan import Plan, forced_plan, weights_for_fraction
from kvc.ir.request import PlanRequest
from kvc.api import assemble
from kvc.planner.scheduler import make_plan
from kvc.compiler.trace import trace_step

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


def mb_plan(mode, layers, m, fraction=0.5, streamed=0.0, chunks=2):
    plan = forced_plan(mode, layers, 7, 8, 64, fraction, act_chunks=chunks, micro_batches=m)
    return replace(plan, weights_streamed=weights_for_fraction(layers, streamed))


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-llama-gqa"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,streamed", [(2, 0.0), (3, 1.0), (2, 0.5)])
def test_parity_with_micro_batches(name, mode, m, streamed):
    spec, ref_model = model(name)
    ids = torch.randint(0, spec.vocab_size, (6, 7), generator=torch.Generator().manual_seed(5))
    ref_tokens, ref_logits = ReferenceDecoder(ref_model, spec).generate(ids, 6, return_logits=True)
    _, mdl = model(name)
    plan = mb_plan(mode, spec.num_layers, m, streamed=streamed)
    cm = assemble(lower(mdl, plan), plan, spec, torch.float32, torch.device("cpu"))
    try:
        tokens, logits = cm.generate(ids, 6, return_logits=True)
        assert cm._cache.batch == 6 // m and len(cm._cache.pool_index) == (
            0 if mode == "gpu_resident" else spec.num_layers * m)
    finally:
        cm.close()
    assert torch.equal(tokens, ref_tokens), (name, mode, m)
    assert (logits - ref_logits.float()).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_parity_with_resident_layers_and_micro_batches(name):
    """Resident units keep a device cache of b/m sequences each, beside offloaded ones."""
    spec, ref_model = model(name)
    ids = torch.randint(0, spec.vocab_size, (4, 7), generator=torch.Generator().manual_seed(6))
    ref_tokens, ref_logits = ReferenceDecoder(ref_model, spec).generate(ids, 6, return_logits=True)
    _, mdl = model(name)
    plan = mb_plan("pipelined", spec.num_layers, 2, streamed=1.0)
    plan = replace(plan, resident=(True, True) + (False, False) * (spec.num_layers - 1))
    cm = assemble(lower(mdl, plan), plan, spec, torch.float32, torch.device("cpu"))
    try:
        tokens, logits = cm.generate(ids, 6, return_logits=True)
    finally:
        cm.close()
    assert torch.equal(tokens, ref_tokens)
    assert (logits - ref_logits.float()).abs().max().item() <= ATOL


def test_lp_plan_with_micro_batches_matches_the_reference():
    """A solved plan (not a forced fraction) through kvc.compile / kvc.load."""
    cfg = {"model": {"preset": "tiny-llama", "dtype": "float32"}, "hardware": "cpu",
           "workload": {"batch_size": 4, "prompt_len": 8, "gen_len": 8, "num_gpu_batches": 2}}
    art = kvc.compile(cfg, ["schedule.weight_stream_fraction=1"])
    try:
        loaded = kvc.load(art, device="cpu")
        assert loaded.plan.micro_batches == 2 and len(loaded.plan.resident) == 2 * 2
        ids = torch.randint(0, 512, (4, 8), generator=torch.Generator().manual_seed(2))
        spec = preset("tiny-llama")
        want = ReferenceDecoder(build_model(spec, "cpu", torch.float32, seed=0), spec).generate(ids, 8)
        assert torch.equal(loaded.generate(ids, 8), want)
        # a batch that does not split into 2 (e.g. `kvc run` with one prompt) is padded
        seen = []
        got = loaded.generate(ids[:3], 8, on_token=lambda step, t: seen.append(t.shape[0]))
        assert torch.equal(got, want[:3]) and set(seen) == {3}
    finally:
        import shutil

        shutil.rmtree(art, ignore_errors=True)


# --- the graph ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prefill", [False, True])
def test_block_order_and_one_weight_copy_per_layer(prefill):
    spec = replace(PRESETS["tiny-llama"], num_layers=3)
    plan = mb_plan("pipelined", 3, 3, streamed=1.0)
    gm = run_pipeline(trace_step(build_model(spec, "meta", "float16"), prefill=prefill), plan)
    firsts = {}
    for k, n in enumerate(gm.graph.nodes):
        u = layer_of(n)
        if u is not None:
            firsts.setdefault(u, k)
    assert sorted(firsts) == list(range(9))
    assert [firsts[u] for u in range(9)] == sorted(firsts.values())  # units in block order
    copies = [op_arg(n, "layer") for n in gm.graph.nodes if is_op(n, "prefetch_weights")]
    assert copies == [0, 1, 2]  # once per layer, not per micro-batch
    writes = sorted(op_arg(n, "layer") for n in gm.graph.nodes if is_op(n, "offload_kv"))
    assert writes == list(range(9))  # each micro-batch writes back its own cache
    assert "micro_batches = input_ids.chunk(3, 0)" in gm.code
    assert "torch.cat([lm_head, lm_head_mb1, lm_head_mb2], 0)" in gm.code


def test_one_micro_batch_leaves_the_graph_as_traced():
    spec = replace(PRESETS["tiny-opt"], num_layers=2)
    m = build_model(spec, "meta", "float16")
    plan = mb_plan("pipelined", 2, 1)
    assert lower(m, plan).code == lower(m, replace(plan, micro_batches=1)).code
    assert "chunk(" not in lower(m, plan).code


@pytest.mark.parametrize("mode", ["pipelined", "kvpr", "full_offload", "gpu_resident"])
@pytest.mark.parametrize("m,streamed", [(2, 0.0), (2, 1.0), (3, 0.5), (3, 1.0)])
def test_no_race_with_micro_batches(mode, m, streamed):
    _, mdl = model("tiny-llama", layers=3)
    plan = mb_plan(mode, 3, m, streamed=streamed)
    pre = run_pipeline(trace_step(mdl, prefill=True), plan)
    dec = run_pipeline(trace_step(mdl, prefill=False), plan)
    assert simulate(plan, [pre] + [dec] * 4) == []


@pytest.mark.parametrize("mode", ["pipelined", "kvpr", "full_offload"])
@pytest.mark.parametrize("resident_layers", [(True, False, False), (False, True, False), (False, False, True)])
def test_no_race_with_resident_layers_and_micro_batches(mode, resident_layers):
    """A layer whose cache stays on the GPU (all its units resident) between offloaded ones:
    the staging slots alternate over the offloaded units only, across the gap."""
    _, mdl = model("tiny-llama", layers=3)
    plan = mb_plan(mode, 3, 2, streamed=0.5)
    plan = replace(plan, resident=tuple(r for r in resident_layers for _ in range(2)))
    pre = run_pipeline(trace_step(mdl, prefill=True), plan)
    dec = run_pipeline(trace_step(mdl, prefill=False), plan)
    assert simulate(plan, [pre] + [dec] * 4) == []


def test_simulator_sees_a_missing_unit_wait():
    """Negative control: drop the wait before micro-batch 1's staged K,V and it is a race."""
    _, mdl = model("tiny-opt", layers=2)
    plan = mb_plan("pipelined", 2, 2)
    pre = run_pipeline(trace_step(mdl, prefill=True), plan)
    dec = run_pipeline(trace_step(mdl, prefill=False), plan)
    assert simulate(plan, [pre] + [dec] * 3) == []
    assert simulate(plan, [pre] + [dec] * 3, skip=(dec, {"wait_kv_ready_1"}))


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-llama-gqa"])
@pytest.mark.parametrize("m", [2, 3])
def test_host_nodes_count_micro_batches(name, m):
    spec = replace(PRESETS[name], num_layers=3)
    for mode, frac, chunks in (("gpu_resident", 0, 1), ("full_offload", 0, 1),
                               ("kvpr", 0.5, 1), ("pipelined", 0.5, 3)):
        plan = replace(forced_plan(mode, 3, 8, 8, 64, frac, act_chunks=chunks, micro_batches=m),
                       weights_streamed=(True, False, True))
        gm = lower(build_model(spec, "meta", "float16"), plan).decode
        nodes = sum(n.op not in ("placeholder", "get_attr", "output") for n in gm.graph.nodes)
        rec = [frac > 0 and mode != "gpu_resident"] * plan.num_units
        got = cost.host_nodes(spec, plan.resident, rec, plan.act_chunks, plan.weights_streamed, m)
        assert got == nodes, (name, mode)
        by_kind = host_kinds(gm)
        assert list(cost.host_node_kinds(spec, plan.resident, rec, plan.act_chunks, plan.weights_streamed, m)) == [by_kind[k] for k in HOST_KINDS], (name, mode)


# --- planning -----------------------------------------------------------------------------------

def test_scheduler_plans_units():
    spec, h = PRESETS["opt-6.7b"], hw("h100-pcie5", gpu_mem_gb=40.0, cpu_mem_gb=512.0)
    one = make_plan(spec, h, PlanRequest(batch_size=32, prompt_len=256, gen_len=8, dtype="float16",
                    mode="pipelined"))
    four = make_plan(spec, h, PlanRequest(batch_size=32, prompt_len=256, gen_len=8, dtype="float16",
                     mode="pipelined", micro_batches=4))
    assert four.micro_batches == 4 and four.num_units == 4 * spec.num_layers
    assert len(four.resident) == len(four.recompute[0]) == four.num_units
    for i in range(spec.num_layers):  # a layer's micro-batches share its split
        units = four.layer_units(i)
        assert len({four.resident[u] for u in units}) == 1
        assert all(row[u] == row[units[0]] for row in four.recompute for u in units)
    # staging is per micro-batch
    assert four.notes["memory_gb"]["staging_gb"] < one.notes["memory_gb"]["staging_gb"]
    assert Plan.from_json(four.to_json()) == four
    assert "micro_batches" not in one.to_json()  # one micro-batch: manifests as before


def test_memory_terms_per_micro_batch():
    spec, h = PRESETS["opt-13b"], hw("h100-pcie5")
    one = cost.memory_terms(spec, h, 64, 288, "float16", 2, True)
    four = cost.memory_terms(spec, h, 64, 288, "float16", 2, True, micro_batches=4)
    assert four["staging_gb"] == pytest.approx(one["staging_gb"] / 4)
    assert four["layer_kv_gb"] == one["layer_kv_gb"]  # a resident layer holds every micro-batch
    assert four["workspace_gb"] < one["workspace_gb"]


def test_weight_copy_is_charged_once_per_layer():
    spec, h = PRESETS["opt-6.7b"], hw("h100-pcie5")
    c = cost.layer_costs(spec, h, 8, "float16")
    W = cost.weight_durations(c, [1.0, 0.0, 0.5], (), 3)
    assert W.shape == (9,) and np.count_nonzero(W) == 2
    assert W[0] == pytest.approx(c.weight_copy) and W[6] < W[0] and W[3] == 0


def test_bad_micro_batch_counts_are_one_line_errors():
    spec, h = PRESETS["opt-1.3b"], hw("h100-pcie5")
    with pytest.raises(KvcError, match="does not split into workload.num_gpu_batches = 3"):
        make_plan(spec, h, PlanRequest(batch_size=8, prompt_len=64, gen_len=8, dtype="float16",
                  mode="pipelined", micro_batches=3))
    with pytest.raises(KvcError, match="num_gpu_batches = 0"):
        make_plan(spec, h, PlanRequest(batch_size=8, prompt_len=64, gen_len=8, dtype="float16",
                  mode="pipelined", micro_batches=0))
    with pytest.raises(ValueError, match="resident flags"):
        Plan(mode="pipelined", num_layers=2, prompt_len=1, gen_len=1, chunk_tokens=1,
             resident=(False,) * 2, micro_batches=2)


# --- the policy search ----------------------------------------------------------------------------

def test_search_policy_keeps_the_best_candidate_that_fits():
    from kvc.planner.scheduler import search_policy

    spec = PRESETS["opt-1.3b"]
    h = hw("h100-pcie5", gpu_mem_gb=6.0, cpu_mem_gb=8.0)
    tried: list = []
    req = PlanRequest(batch_size=1, prompt_len=256, gen_len=8, dtype="float16", mode="pipelined",
                      weight_stream_fraction=1.0, resident_cache=False)
    plan, tps = search_policy(spec, h, req, batch_sizes=(8, 16, 64, 256, 1024),
                              micro_batches=(1, 2, 4), tried=tried)
    ok = [t for t in tried if "tokens_per_s" in t]
    assert any("refused" in t for t in tried)  # the host budget stops the largest batches
    assert tps == max(t["tokens_per_s"] for t in ok)
    assert (plan.batch_size, plan.micro_batches) in {(t["batch"], t["micro_batches"]) for t in ok}
    assert all(plan.resident[u] is False for u in range(plan.num_units))  # resident_cache=false
    with pytest.raises(KvcError, match="cpu_mem_gb"):
        search_policy(spec, hw("h100-pcie5", cpu_mem_gb=0.5), req.but(resident_cache=True),
                      batch_sizes=(512,), micro_batches=(1,))


def test_cli_plan_search(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "m.yaml"
    cfg.write_text("model: {preset: tiny-opt, dtype: float32}\nhardware: cpu\n"
                   "workload: {prompt_len: 16, gen_len: 8}\n")
    out = subprocess.run([sys.executable, "-m", "kvc.cli", "plan", str(cfg), "--search", "32",
                          "schedule.weight_stream_fraction=1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "micro-batches" in out.stdout and "best: batch" in out.stdout
    assert "workload.num_gpu_batches=" in out.stdout.splitlines()[-1]
    bad = subprocess.run([sys.executable, "-m", "kvc.cli", "plan", str(cfg), "--search", "0"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--search 0" in bad.stderr and "Traceback" not in bad.stderr


def test_reference_in_micro_batches_is_the_same_decode_per_slice():
    """The block schedule's reference (fp16 GPU checks hold m=2 against it): each slice
    decoded on its own, concatenated; in fp32 the same tokens as the whole batch."""
    spec, m = model("tiny-llama")
    ref = ReferenceDecoder(m, spec)
    ids = torch.randint(0, spec.vocab_size, (4, 6), generator=torch.Generator().manual_seed(2))
    t, logits = ref.generate_in_micro_batches(ids, 5, 2, return_logits=True)
    whole_t, whole_l = ref.generate(ids, 5, return_logits=True)
    assert torch.equal(t, whole_t)
    assert (logits - whole_l).abs().max().item() <= 1e-5
    assert torch.equal(ref.generate_in_micro_batches(ids[:2], 5, 2), ref.generate(ids[:2], 5))
    with pytest.raises(ValueError, match="does not split"):
        ref.generate_in_micro_batches(ids[:3], 5, 2)
