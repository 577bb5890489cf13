"""Weight streaming (issue 6, first piece): a layer's weights in a pinned CPU pool, copied into
one of two GPU weight slots one layer ahead, through the same passes, events and runtime.

CPU only: parity against the reference decoder, the pass's placement, the race simulator,
the scheduler's greedy placement and the cost model's copy-stream charge, Plan I/O.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from kvc.ir.graph import HOST_KINDS, host_kinds
from kvc.passes.nodes import is_op, op_arg
from kvc.passes.pipeline import run_pipeline
from stream_simulator import simulate, weight_layers

import kvc
from kvc.planner import cost
from kvc.errors import KvcError
from kvc.compiler.lowering import lower
from kvc.models import layer_param_count
from kvc.models import build_model, layer_param_sizes, preset
from kvc.runtime.reference import ReferenceDecoder
from kvc.models import PRESETS
from kvc.ir.modes import NAMES as MODES
from kvc.ir.plan import Plan, forced_plan, spread_layers, weights_for_fraction
from kvc.ir.request import PlanRequest
from kvc.api import assemble
from kvc.planner.scheduler import make_plan, predict
from kvc.compiler.trace import trace_step
from kvc_fixtures import hw, perturb_small_params

CONF = Path(__file__).resolve().parents[1] / "conf" / "hardware"
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def model(name: str, layers: int | None = None):
    """Dummy weights plus random biases and norm scales (as test_compiled_parity does); a new
    object per call, since a weight-streaming CompiledModel takes its parameters over."""
    spec = preset(name) if layers is None else replace(preset(name), num_layers=layers)
    m = perturb_small_params(build_model(spec, "cpu", torch.float32, seed=0))
    return spec, m


def streaming_plan(mode, layers, fraction, prompt=7, gen=6, recompute=0.5, chunks=2) -> Plan:
    plan = forced_plan(mode, layers, prompt, gen, 64, recompute, act_chunks=chunks)
    return replace(plan, weights_streamed=weights_for_fraction(layers, fraction))


# --- parity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-llama-gqa"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_parity_with_streamed_weights(name, mode, fraction):
    spec, ref_model = model(name)
    ids = torch.randint(0, spec.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    ref_tokens, ref_logits = ReferenceDecoder(ref_model, spec).generate(ids, 6, return_logits=True)
    _, m = model(name)  # built with the same seed: the compiled model re-points its parameters
    plan = streaming_plan(mode, spec.num_layers, fraction)
    assert sum(plan.weights_streamed) == round(fraction * spec.num_layers)
    cm = assemble(lower(m, plan), plan, spec, torch.float32, torch.device("cpu"))
    try:
        tokens, logits = cm.generate(ids, 6, return_logits=True)
    finally:
        cm.close()
    assert torch.equal(tokens, ref_tokens), (name, mode, fraction)
    assert (logits - ref_logits.float()).abs().max().item() <= ATOL


def test_streamed_parameters_point_into_the_weight_slots():
    spec, m = model("tiny-llama", layers=3)
    plan = streaming_plan("pipelined", 3, 1.0)
    before = [p.detach().clone() for p in m.layers[1].parameters()]
    cm = assemble(lower(m, plan), plan, spec, torch.float32, "cpu")
    slots = cm._weights.slots
    for i in range(3):
        base = slots[plan.weight_slot(i)].data_ptr()
        for p in m.layers[i].parameters():
            assert base <= p.data_ptr() < base + slots.shape[1] * 4
    assert [plan.weight_slot(i) for i in range(3)] == [0, 1, 0]
    # the pool keeps the true values (a view per parameter); a second CompiledModel on the
    # same model copies from it
    pool, flat = cm._weights.pools[1], cm._weights.flat
    for p, want in zip(m.layers[1].parameters(), before):
        src = p._kvc_weight_source
        assert torch.equal(src, want)
        assert pool.data_ptr() <= src.data_ptr() < pool.data_ptr() + pool.nbytes
    assert pool.numel() == sum(b.numel() for b in before)
    # the layers' pools are consecutive slices of one allocation, nothing between them
    assert all(q.untyped_storage().data_ptr() == flat.data_ptr() for q in cm._weights.pools.values())
    starts = [cm._weights.pools[i].data_ptr() - flat.data_ptr() for i in range(3)]
    sizes = [cm._weights.pools[i].nbytes for i in range(3)]
    assert starts == [0, sizes[0], sizes[0] + sizes[1]] and flat.nbytes == sum(sizes)
    assert cm._weights.nbytes == flat.nbytes
    cm2 = assemble(lower(m, plan), plan, spec, torch.float32, "cpu")
    assert torch.equal(cm2._weights.pools[1], pool)


def test_compile_and_load_with_streamed_weights(tmp_path):
    cfg = {"model": {"preset": "tiny-opt", "dtype": "float32"}, "hardware": "cpu",
           "workload": {"batch_size": 2, "prompt_len": 8, "gen_len": 8}}
    art = kvc.compile(cfg, ["schedule.recompute_fraction=0.5", "schedule.weight_stream_fraction=1"],
                      output=tmp_path / "w.kvc")
    loaded = kvc.load(art, device="cpu")
    assert loaded.plan.weights_streamed == (True, True)
    assert "prefetch_weights_1" in (art / "graph.py").read_text()
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(1))
    ref = build_model(preset("tiny-opt"), "cpu", torch.float32, seed=0)
    want = ReferenceDecoder(ref, preset("tiny-opt")).generate(ids, 8)
    assert torch.equal(loaded.generate(ids, 8), want)


def test_config_validates_the_fraction():
    cfg = {"model": {"preset": "tiny-opt", "dtype": "float32"}, "hardware": "cpu"}
    with pytest.raises(KvcError, match="schedule.weight_stream_fraction"):
        kvc.compile(cfg, ["schedule.weight_stream_fraction=1.5"], output="/tmp/never.kvc")


# --- the pass -----------------------------------------------------------------------------------

def _first_nodes(gm) -> dict[int, str]:
    return {i: d["first"] for i, d in gm.meta["kvc"]["layers"].items()}


@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("mode", ["pipelined", "kvpr", "full_offload", "gpu_resident"])
def test_prefetch_weights_one_layer_ahead(mode, prefill):
    _, m = model("tiny-llama", layers=4)
    plan = streaming_plan(mode, 4, 0.5)  # layers 0 and 2 (spread: (k + 0.5) * 4 / 2 -> 1, 3)
    streamed = plan.streamed_layers
    assert streamed == [1, 3]
    gm = run_pipeline(trace_step(m, prefill=prefill), plan)
    nodes = list(gm.graph.nodes)
    pos = {n.name: k for k, n in enumerate(nodes)}
    copies = [n for n in nodes if is_op(n, "prefetch_weights")]
    assert [op_arg(n, "layer") for n in copies] == streamed
    first = _first_nodes(gm)
    for n in copies:
        i = op_arg(n, "layer")
        assert n.name == f"prefetch_weights_{i}" and n.meta["kvc"]["stream"] == "prefetch"
        # before layer i-1's first node, after layer i-2's
        assert pos[n.name] < pos[first[i - 1]]
        if i >= 2:
            assert pos[n.name] > pos[first[i - 2]]
        # ahead of the layer's own cache prefetches on the copy stream
        own = [x for x in nodes if (is_op(x, "prefetch_act") or is_op(x, "prefetch_kv"))
               and op_arg(x, "layer") == i]
        assert all(pos[n.name] < pos[x.name] for x in own)
        # its events: ready before the layer's first node, slot free after its last reader
        assert f"record_weights_ready_{i}" in pos and f"wait_weights_ready_{i}" in pos
        assert pos[f"wait_weights_ready_{i}"] < pos[first[i]]
        # (the last node that reads its parameters: the refill may start before the layer's
        # trailing residual add)
        last = max(k for k, x in enumerate(nodes) if i in weight_layers(x))
        assert pos[f"record_weight_slot_free_{i}"] > last


def test_no_streaming_leaves_the_code_as_it_was():
    for name in ("tiny-opt", "tiny-llama-gqa"):
        spec, m = model(name)
        for mode in MODES:
            plan = forced_plan(mode, spec.num_layers, 7, 6, 64, 0.5, act_chunks=2)
            none = replace(plan, weights_streamed=(False,) * spec.num_layers)
            a, b = lower(m, plan), lower(m, none)
            assert a.code == b.code and a.num_events == b.num_events
            assert "prefetch_weights" not in a.code and "weights_ready" not in a.code
            assert "weight_slot_free" not in a.code


def test_host_nodes_count_the_weight_nodes():
    for name in ("tiny-opt", "tiny-llama", "tiny-llama-gqa"):
        spec = replace(PRESETS[name], num_layers=3)
        for mode, frac, chunks in (("gpu_resident", 0, 1), ("full_offload", 0, 1),
                                   ("kvpr", 0.5, 1), ("pipelined", 0.5, 3)):
            plan = replace(forced_plan(mode, 3, 8, 8, 64, frac, act_chunks=chunks),
                           weights_streamed=(True, False, True))
            gm = lower(build_model(spec, "meta", "float16"), plan).decode
            nodes = sum(n.op not in ("placeholder", "get_attr", "output") for n in gm.graph.nodes)
            rec = [frac > 0 and mode != "gpu_resident"] * 3
            got = cost.host_nodes(spec, plan.resident, rec, plan.act_chunks, plan.weights_streamed)
            assert got == nodes, (name, mode)
            by_kind = host_kinds(gm)
            assert list(cost.host_node_kinds(spec, plan.resident, rec, plan.act_chunks, plan.weights_streamed)) == [by_kind[k] for k in HOST_KINDS], (name, mode)


# --- races ----------------------------------------------------------------------------------------

def _graphs(m, plan, decode_steps=4):
    pre = run_pipeline(trace_step(m, prefill=True), plan)
    dec = run_pipeline(trace_step(m, prefill=False), plan)
    return dec, [pre] + [dec] * decode_steps


@pytest.mark.parametrize("mode", ["pipelined", "kvpr", "full_offload", "gpu_resident"])
@pytest.mark.parametrize("streamed", [(True, True, True), (False, True, False), (True, False, True),
                                      (True, True, True, True)])
def test_no_race_with_streamed_weights(mode, streamed):
    layers = len(streamed)
    _, m = model("tiny-llama", layers=layers)
    plan = replace(forced_plan(mode, layers, 6, 8, 64, 0.5, act_chunks=2), weights_streamed=streamed)
    assert simulate(plan, _graphs(m, plan)[1]) == []


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("streamed", [(True, True, True), (True, False, True)])
def test_every_weight_event_node_is_needed(name, streamed):
    """Negative control: drop any one weight event (or the copy itself, where another layer
    shares the slot) from the decode graph and the simulator finds a race.

    One exception, as for the staging slots (test_passes.py::test_every_event_node_is_needed):
    with 3 streamed layers, layer 1 alone uses weight slot 1, and the prefetch stream already
    waited (before prefetch_weights_0) until layer 2 freed slot 0 in the previous step, which
    is after layer 1 freed slot 1 there: wait_weight_slot_free_1 and its only record are
    implied."""
    _, m = model(name, layers=3)
    plan = replace(forced_plan("pipelined", 3, 6, 8, 64, 0.5, act_chunks=2), weights_streamed=streamed)
    dec, graphs = _graphs(m, plan)
    assert simulate(plan, graphs) == []
    names = [n.name for n in dec.graph.nodes
             if n.name.startswith(("prefetch_weights", "record_weight", "wait_weight"))]
    assert len(names) == 5 * sum(streamed)
    implied = {"wait_weight_slot_free_1", "record_weight_slot_free_1"} if all(streamed) else set()
    for name_ in names:
        if name_.startswith("prefetch_weights"):
            i = int(name_.rsplit("_", 1)[1])
            if [plan.weight_slot(j) for j in plan.streamed_layers].count(plan.weight_slot(i)) == 1:
                continue  # the layer owns its slot: it already holds its weights
        found = simulate(plan, graphs, skip=(dec, {name_}))
        assert bool(found) != (name_ in implied), f"dropping {name_}: {found}"


# --- scheduler and cost model -------------------------------------------------------------------

def test_spread_layers():
    assert spread_layers(4, 2) == (False, True, False, True)
    assert spread_layers(3, 3) == (True, True, True) and spread_layers(5, 0) == ()
    assert sum(spread_layers(32, 7)) == 7


def test_scheduler_places_weights_with_the_lp():
    """Weights that do not fit: the LP picks per-layer fractions, rounded up to whole
    parameters; the result fits the budget and streams no more than the fewest whole layers
    that would (the greedy placement it replaced), and smaller slots can make it stream less."""
    spec, h = PRESETS["opt-6.7b"], hw("h100-pcie5", gpu_mem_gb=12.0, cpu_mem_gb=512.0)
    sizes = layer_param_sizes(spec)
    allowed = {0.0} | {sum(sizes[:k]) / sum(sizes) for k in range(1, len(sizes) + 1)}
    for mode in ("full_offload", "pipelined", "kvpr"):
        pl = make_plan(spec, h, PlanRequest(batch_size=4, prompt_len=256, gen_len=8, dtype="float16", mode=mode))
        look = pl.lookahead + 1
        fits = lambda w: cost.memory_terms(spec, h, 4, 264, "float16", look, False, w)["free_gb"] >= 0  # noqa: E731
        greedy = next(n for n in range(spec.num_layers + 1) if fits(n))
        assert 0 < greedy < spec.num_layers
        n = sum(pl.weights_streamed)
        assert 0 < n <= greedy + 1e-9, mode
        assert fits(list(pl.weights_streamed)), mode
        assert all(min(abs(f - a) for a in allowed) < 1e-12 for f in pl.weights_streamed)
        assert "LP" in pl.notes["weights"]
        assert pl.notes["memory_gb"]["weights_streamed"] == round(n, 4)
    # enough memory: nothing streams, and the plan is what it was
    roomy = make_plan(spec, hw("h100-pcie5"), PlanRequest(batch_size=4, prompt_len=256, gen_len=8,
                      dtype="float16", mode="pipelined"))
    assert roomy.weights_streamed == () and "weights_streamed" not in roomy.to_json()


def test_gpu_resident_never_streams_on_its_own():
    with pytest.raises(KvcError, match="gpu_resident does not fit"):
        make_plan(PRESETS["opt-6.7b"], hw("h100-pcie5", gpu_mem_gb=12.0), PlanRequest(batch_size=1,
                  prompt_len=16, gen_len=2, dtype="float16", mode="gpu_resident"))


def test_streamed_weights_count_against_host_memory():
    spec = PRESETS["opt-6.7b"]
    with pytest.raises(KvcError, match="pinned CPU pools"):
        make_plan(spec, hw("h100-pcie5", cpu_mem_gb=4.0), PlanRequest(batch_size=1, prompt_len=16, gen_len=2,
                  dtype="float16", mode="full_offload", weight_stream_fraction=1.0))


def test_cost_charges_weight_bytes_on_the_copy_stream():
    """full_offload at a long context is link-bound: streaming every layer's weights adds about
    their bytes / h2d to the step, and exactly that to the link's busy time."""
    spec = PRESETS["opt-6.7b"]
    h = hw("h100-pcie5", cpu_mem_gb=512.0)
    kw = {"batch_size": 8, "prompt_len": 4096, "gen_len": 1, "dtype": "float16",
          "mode": "full_offload"}
    base = make_plan(spec, h, PlanRequest(**kw))
    streamed = make_plan(spec, h, PlanRequest(weight_stream_fraction=1.0, **kw))
    a, b = (predict(spec, h, p, 4096, 8, "float16") for p in (base, streamed))
    c = cost.layer_costs(spec, h, 8, "float16")
    w_ms = layer_param_count(spec) * 2 / (h.h2d_gbps * 1e9) * 1e3 * c.copy_slowdown
    assert c.weight_copy == pytest.approx(w_ms + h.link_latency_us * 1e-3 * c.copy_slowdown)
    L = spec.num_layers
    assert b["link_busy_ms"] - a["link_busy_ms"] == pytest.approx(L * c.weight_copy)
    assert a["link_busy_ms"] > a["gpu_busy_ms"]  # the link is the bottleneck
    grow = b["predicted_step_ms"] - a["predicted_step_ms"]
    assert grow == pytest.approx(L * c.weight_copy, rel=0.05)


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("look,chunks", [(1, 2), (0, 1), (1, 1)])
def test_simulate_and_lp_agree_with_weights(look, chunks, m):
    """The LP's optimal step equals cost.simulate on the LP's own split: the weight copy W_i
    enters both the same way, with one micro-batch or several (units). Fixed latencies are
    zeroed (the LP charges them to every layer, durations only where the work exists) so the
    two are exactly comparable."""
    from kvc.planner import scheduler

    spec = PRESETS["opt-6.7b"]
    h = hw("h100-pcie5", link_latency_us=0, launch_us=0, attn_fixed_us=0, gemm_half_rows=0)
    c = cost.layer_costs(spec, h, 16, "float16")
    L, s = 6, 1024
    streamed = [True, False, True, True, False, True]
    wcopy = [c.weight_copy if w else 0.0 for w in streamed]
    kw = dict(look=look, chunks=chunks, resident=(False,) * L, deadline=1e18, m=m, with_step=True)

    def simulated(x, w):
        l = cost.per_unit(np.array(x)[:, None] * s, m)
        U = L * m
        A, K, R, C, D = cost.durations(c, np.full((U, 1), s), l, np.zeros((U, 1), bool), chunks)
        R = np.where(l > 0, R, chunks * c.rec_chunk_fixed)  # the LP pays the chunk's weight read always
        W = cost.weight_durations(c, w, (1,), m)
        return cost.simulate(A, K, R, C, D, m * c.head, look, chunks, W=W, weight_lag=m + 1,
                             back=c.layer_back, front=c.layer_front)[0][0]

    x, _, _, T = scheduler._solve(c, L, s, wcopy=wcopy, **kw)
    assert simulated(x, streamed) == pytest.approx(T, rel=1e-6)
    _, _, _, T0 = scheduler._solve(c, L, s, **kw)
    assert T > T0  # the weights cost the step something
    # weight placement as LP variables: the LP's own fractions simulate to its step
    layer_gb = layer_param_count(spec) * 2 / 1e9
    x, _, w, Tw = scheduler._solve(c, L, s, weight_budget=(c.weight_copy, layer_gb, 3.5 * layer_gb), **kw)
    assert sum(layer_gb * (1 - f) for f in w) + 2 * max(w) * layer_gb <= 3.5 * layer_gb + 1e-6
    assert simulated(x, w) == pytest.approx(Tw, rel=1e-6)


def test_memory_terms_with_streamed_weights():
    spec, h = PRESETS["opt-6.7b"], hw("h100-pcie5")
    base = cost.memory_terms(spec, h, 1, 2047, "float16", 2, False)
    st = cost.memory_terms(spec, h, 1, 2047, "float16", 2, False, 10)
    layer = layer_param_count(spec) * 2 / 1e9
    assert "weights_streamed" not in base
    assert st["weights_gb"] == pytest.approx(base["weights_gb"] - 10 * layer)
    assert st["weight_slots_gb"] == pytest.approx(2 * layer)
    assert st["free_gb"] == pytest.approx(base["free_gb"] + 8 * layer)


# --- Plan I/O ---------------------------------------------------------------------------------

def test_plan_json_round_trip_with_and_without_weights():
    plan = forced_plan("pipelined", 4, 8, 8, 64, 0.5)
    d = plan.to_json()
    assert "weights_streamed" not in d  # manifests of non-streaming plans are unchanged
    assert Plan.from_json(d) == plan
    st = replace(plan, weights_streamed=(False, True, False, True))
    d = st.to_json()
    assert d["weights_streamed"] == [False, True, False, True]
    back = Plan.from_json(d)
    assert back == st and back.streamed_layers == [1, 3] and back.weight_slot(3) == 1
    assert back.streams_weights(1) and not back.streams_weights(0)
    assert not plan.streams_weights(0) and plan.streamed_layers == []


def test_plan_report_shows_streamed_layers():
    from kvc.reports.plan import plan_json, plan_text

    kw = {"batch_size": 4, "prompt_len": 256, "gen_len": 8, "dtype": "float16",
          "mode": "full_offload", "chunk_tokens": 64, "act_chunks": 1}
    h = hw("h100-pcie5", gpu_mem_gb=12.0, cpu_mem_gb=512.0)
    d = plan_json(PRESETS["opt-6.7b"], h, PlanRequest(**kw))
    n = len(d["weights_streamed"])
    assert n > 0 and "weight_slots_gb" in d["memory_gb"]
    assert d["h2d_bytes"] >= n * layer_param_count(PRESETS["opt-6.7b"]) * 2
    assert "weights streamed from CPU" in plan_text(PRESETS["opt-6.7b"], h, PlanRequest(**kw))


# --- building in place ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_streamed_weights_are_built_in_their_pool(name):
    """build_model(place=place_streamed(...)): the streamed parameters are drawn straight into
    one host pool (never on the device), equal to an ordinary build's, and the WeightStreamer
    adopts that pool instead of allocating and copying a second one."""
    from kvc.runtime.weights import place_streamed

    spec = preset(name)
    ref = build_model(spec, "cpu", torch.float32, seed=0)
    plan = replace(forced_plan("pipelined", spec.num_layers, 8, 8, 64, 0.5, micro_batches=2),
                   weights_streamed=(1.0, 0.5))
    m = build_model(spec, "cpu", torch.float32, seed=0, place=place_streamed(plan, "cpu"))
    for (n, a), (_, b) in zip(ref.named_parameters(), m.named_parameters()):
        assert torch.equal(a, b), n
    placed = [p for p in m.parameters() if hasattr(p, "_kvc_weight_pool")]
    flat = placed[0]._kvc_weight_pool
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.nbytes
    assert all(lo <= p.data_ptr() < hi for p in placed)
    assert sum(p.numel() for p in placed) == flat.numel()
    # layer 1 streams half: its largest parameters, the rest stay outside the pool
    layer1 = dict(m.layers[1].named_parameters())
    outside = [k for k, p in layer1.items() if not lo <= p.data_ptr() < hi]
    assert outside and len(outside) < len(layer1)
    cm = assemble(lower(m, plan), plan, spec, torch.float32, torch.device("cpu"))
    try:
        assert cm._weights.flat is flat
        ids = torch.randint(0, spec.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0))
        assert torch.equal(cm.generate(ids, 6), ReferenceDecoder(ref, spec).generate(ids, 6))
    finally:
        cm.close()


def test_load_builds_a_checkpoint_in_place(tmp_path, monkeypatch):
    """kvc.load of a weight-streaming artifact over a checkpoint: loaded into the pool (one pool
    allocated, by the placement; the streamer adopts it), and the tokens equal the reference
    decoder's on the same checkpoint."""
    from hf_fixtures import hf_model, save_checkpoint

    from kvc.runtime import weights as weights_mod

    pools = []
    real = weights_mod.pinned_empty
    monkeypatch.setattr(weights_mod, "pinned_empty", lambda *a, **k: pools.append(a) or real(*a, **k))

    from kvc.models.checkpoint import read_config
    from kvc.models import spec_from_hf_config

    ckpt = save_checkpoint(hf_model("llama2-mha"), tmp_path / "ckpt")
    cfg = {"model": {"checkpoint": str(ckpt), "dtype": "float32"}, "hardware": "cpu",
           "workload": {"batch_size": 2, "prompt_len": 4, "gen_len": 4, "num_gpu_batches": 2}}
    art = kvc.compile(cfg, ["schedule.weight_stream_fraction=1", "schedule.recompute_fraction=0.5"],
                      output=tmp_path / "w.kvc")
    loaded = kvc.load(art, device="cpu")
    assert len(pools) == 1
    assert loaded._weights.flat.numel() == sum(
        p.numel() for i in loaded.plan.streamed_layers
        for p in loaded.lowered.decode.get_submodule(f"layers.{i}").parameters())
    spec = spec_from_hf_config(read_config(ckpt))
    ref = build_model(spec, "cpu", torch.float32, checkpoint=ckpt)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert torch.equal(loaded.generate(ids, 4), ReferenceDecoder(ref, spec).generate(ids, 4))
