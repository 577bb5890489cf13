"""Issue 17, the planner's half: the CPU attention lane as a fourth source per layer. The LP
decides how many of each offloaded layer's oldest cached tokens the CPU attends to; a machine
without a lane never gets one; auto is never predicted slower than off; the LP, the numpy walk
and the timeline agree; plans with CPU rows round-trip through the manifest."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from kvc_fixtures import hw

import kvc
import kvc.artifact as art
from kvc.errors import KvcError
from kvc.ir.plan import Plan
from kvc.ir.request import PlanRequest
from kvc.models import PRESETS
from kvc.planner import cost, lanes, lp
from kvc.planner.evaluate import cpu_table, evaluate, predict
from kvc.planner.scheduler import host_memory_gb, make_plan

OPT = PRESETS["opt-6.7b"]
# full_offload: the lane alone; OPT's pipelined and kvpr plans pair it with recompute
REQ = PlanRequest(batch_size=32, prompt_len=1024, gen_len=8, dtype="float16",
                  resident_cache=False, max_context=2048, mode="full_offload", cpu_attention="auto")
FAST = hw("h200-pcie5", cpu_attn_gbps=40.0)  # the OPT-6.7B row: 537 MB in ~13 ms


def _plan(h=FAST, **kw) -> Plan:
    return make_plan(OPT, h, REQ.but(**kw))


def test_no_lane_on_a_machine_without_one():
    """hardware.cpu_attn_gbps 0: no CPU tokens, whatever the mode, and the plan is the one
    schedule.cpu_attention off makes."""
    h = hw("h200-pcie5", cpu_attn_gbps=0.0)
    for mode in ("pipelined", "kvpr", "full_offload"):
        plan = _plan(h, mode=mode)
        assert not plan.cpu_lane and plan.cpu == () and plan.cpu_threads == 0
        assert plan.recompute == _plan(h, mode=mode, cpu_attention="off").recompute
        assert "cpu" not in plan.to_json() and "cpu_threads" not in plan.to_json()


def test_a_fast_lane_takes_tokens_and_the_step_gets_faster():
    on, off = _plan(), _plan(cpu_attention="off")
    assert on.cpu_lane and not off.cpu_lane
    s = REQ.prompt_len
    c = [on.cpu_tokens(u, s, s) for u in range(on.num_units)]
    assert all(0 < x < s for x in c), c
    assert all(on.recompute_tokens(u, s) == 0 for u in range(on.num_units))
    assert sum(on.predicted_step_ms) < 0.9 * sum(off.predicted_step_ms)
    # auto is never predicted slower than off, at any context of the workload
    assert all(a <= b + 1e-9 for a, b in zip(on.predicted_step_ms, off.predicted_step_ms))
    assert on.cpu_threads == FAST.cpu_attn_threads
    # the lane keeps every host pool row: K,V and activations of all max_context rows, and its
    # head-major copies of the oldest rows it reads, up to the largest c
    full = cost.host_pool_bytes(OPT, 32, 2048, 2, OPT.num_layers, 2048)
    most = max(x for row in on.cpu for x in row)
    copies = OPT.num_layers * cost.kv_bytes(OPT, 32, most, 2)
    assert host_memory_gb(OPT, on, 32, "float16") == pytest.approx((full + copies) / 1e9)


@pytest.mark.parametrize("spec_name", ["opt-6.7b", "llama-3-8b"])
@pytest.mark.parametrize("mode", ["pipelined", "kvpr", "full_offload"])
def test_auto_is_never_slower_than_off(mode, spec_name):
    """On a slow lane (where it pays only somewhere) and a fast one: at every decode context of
    the workload, and where the plan without the lane recomputes nothing (full_offload), at
    every context of the table."""
    spec = PRESETS[spec_name]
    for gbps in (4.0, 40.0):
        h = hw("h200-pcie5", cpu_attn_gbps=gbps)
        on = make_plan(spec, h, REQ.but(mode=mode))
        off = make_plan(spec, h, REQ.but(mode=mode, cpu_attention="off"))
        ctx = np.arange(1, 2049) if mode == "full_offload" else np.arange(1024, 1032)
        a = evaluate(spec, h, on, ctx, 32, "float16")[0]
        b = evaluate(spec, h, off, ctx, 32, "float16")[0]
        assert np.all(a <= b * (1 + 1e-9)), gbps


def test_auto_pairs_the_lane_with_recompute_where_that_is_fastest():
    """OPT-6.7B pipelined: recomputing from activations beats the lane alone there; the LP with
    both (l and c per layer) is predicted faster than either, so auto plans the pair, and
    predicts it for the table as it runs."""
    on, off = _plan(mode="pipelined"), _plan(mode="pipelined", cpu_attention="off")
    s = REQ.prompt_len
    assert on.cpu_lane and "beside recompute" in on.notes["cpu_attention"]
    assert any(on.recompute_tokens(u, s) > 0 for u in range(on.num_units))
    assert any(on.cpu_tokens(u, s, s) > 0 for u in range(on.num_units))
    assert sum(on.predicted_step_ms) < 0.9 * sum(off.predicted_step_ms)
    ctx = np.arange(s, s + len(on.predicted_step_ms))
    assert np.allclose(evaluate(OPT, FAST, on, ctx, 32, "float16")[0], on.predicted_step_ms, rtol=1e-4)


def test_a_lane_that_does_not_pay_is_left_off():
    """A lane slower than anything else (and a big fixed cost): auto plans none."""
    h = hw("h200-pcie5", cpu_attn_gbps=0.01, cpu_attn_fixed_us=5000.0)
    plan = _plan(h)
    assert not plan.cpu_lane and plan.predicted_step_ms == _plan(h, cpu_attention="off").predicted_step_ms


def test_gqa_uses_the_lane_where_it_never_recomputes():
    """llama-3-8b (GQA): activations are bigger than K,V, so it recomputes nothing; the lane is
    the only second path beside the link."""
    spec = PRESETS["llama-3-8b"]
    req = PlanRequest(batch_size=32, prompt_len=2048, gen_len=4, dtype="float16",
                      resident_cache=False, max_context=4096, cpu_attention="auto")
    on = make_plan(spec, hw("h200-pcie5", cpu_attn_gbps=50.0), req)
    off = make_plan(spec, hw("h200-pcie5", cpu_attn_gbps=50.0), req.but(cpu_attention="off"))
    assert on.cpu_lane and not any(l for row in on.recompute for l in row)
    assert on.predicted_step_ms[0] < 0.8 * off.predicted_step_ms[0]


def test_a_plan_with_more_resident_layers_keeps_the_rate_its_lane_follows():
    """A GQA plan that recomputes nothing trades the activations' staging for more resident
    layers (scheduler._more_resident): the plan it remakes keeps the lane's figures, the rate
    included, or its lane would never follow the rate it runs at (llama-3-8b's never did on
    the H200, session 13)."""
    spec = PRESETS["llama-3-8b"]
    req = PlanRequest(batch_size=32, prompt_len=2048, gen_len=4, dtype="float16",
                      max_context=2056, cpu_attention="auto")
    on = make_plan(spec, hw("h200-pcie5", cpu_attn_gbps=50.0, gpu_mem_gb=22.0), req)
    assert on.cpu_lane and 0 < sum(on.resident) < spec.num_layers
    assert on.notes["memory_gb"]["staging_for"] == "kv"
    assert on.cpu_gbps == 50.0 and on.cpu_threads > 0


def _lp_instance(seed):
    rng = np.random.default_rng(seed)
    spec = PRESETS[str(rng.choice(["opt-6.7b", "llama-2-7b", "llama-3-8b"]))]
    h = hw("h200-pcie5", cpu_attn_gbps=float(rng.uniform(5, 80)),
           cpu_attn_fixed_us=float(rng.uniform(0, 500)))
    c = cost.layer_costs(spec, h, int(rng.choice([8, 32])), "float16")
    L = int(rng.integers(2, 6))
    look, chunks = [(0, 1), (1, 1), (1, 4)][int(rng.integers(3))]
    kw = {"look": look, "chunks": chunks, "m": int(rng.integers(1, 3)), "deadline": 1e18,
          "with_step": True, "with_values": True, "cpu": "free",
          "resident": tuple(bool(r) for r in rng.random(L) < 0.3)}
    if rng.random() < 0.3:
        kw["fixed_x"] = 0.0
    if rng.random() < 0.3:
        kw["mem_budget"] = (float(rng.uniform(0, 2)), 1.0)
    s = int(rng.choice([128, 1024, 4000]))
    return c, L, s, kw


@pytest.mark.parametrize("seed", range(8))
def test_the_lp_and_the_walk_agree_with_the_lane(seed):
    """The LP's optimal T is the walk's step on the LP's own durations (numpy and intervals),
    and the cost model's durations for the LP's tokens (every fixed cost paid) give the same."""
    c, L, s, kw = _lp_instance(seed)
    x, z, _, y, T, st = lp.solve(c, L, s, **kw)
    assert all(a + b + d <= 1 + 1e-6 for a, b, d in zip(x, y, z))
    A, K, R, C, D, W, P = (np.asarray(v, dtype=float) for v in (st.A, st.K, st.R, st.C, st.D,
                                                                st.W, st.P))
    args = (st.head, st.lookahead, st.act_chunks)
    keys = {"weight_lag": st.weight_lag, "back": st.back, "front": st.front,
            "offloaded": st.offloaded, "streams": st.streams, "cpu": st.cpu}
    step = cost.simulate(*(v[:, None] for v in (A, K, R, C, D)), *args, W=W[:, None],
                         P=P[:, None], **keys)[0][0]
    assert step == pytest.approx(T, rel=1e-6, abs=1e-9)
    items = cost.intervals(A, K, R, C, D, *args, W=W, P=P, **keys)
    assert max(it["end"] for it in items) == pytest.approx(T, rel=1e-6, abs=1e-9)
    cpu_items = [it for it in items if it["lane"] == "cpu"]
    assert bool(cpu_items) == any(st.cpu)
    # the same step from the cost model's per-token durations at the LP's tokens, where every
    # unit pays every fixed cost the LP charged it (x, y and the K,V share all above 0)
    m, n = kw["m"], s
    res = np.repeat(np.array(kw["resident"]), m)
    xu, yu, zu = (np.repeat(np.asarray(v), m) for v in (x, y, z))
    if np.all((xu > 1e-6) & (yu > 1e-6) & (1 - xu - yu - zu > 1e-6) | res) and not any(zu):
        Ac, Kc, Rc, Cc, Dc = cost.durations(c, n, xu * n, res, st.act_chunks, yu * n)
        Pc = cost.cpu_durations(c, np.where(res, 0, yu * n))
        got = cost.simulate(*(v[:, None] for v in (Ac, Kc, Rc, Cc, Dc)), *args,
                            W=W[:, None], P=Pc[:, None], **keys)[0][0]
        assert got == pytest.approx(T, rel=1e-6, abs=1e-9)


def test_the_walk_puts_the_cpu_part_on_the_critical_path():
    """One unit: the CPU part starts when the query exists (after `front`) and the rest of the
    layer (`back`) waits for it; a CPU part shorter than the GPU's attention costs nothing."""
    one = [np.array([[v]]) for v in (0.0, 1.0, 0.0, 3.0, 0.0)]  # A K R C D
    base = cost.simulate(*one, 0.0, 1, 1, front=0.5, back=1.0, offloaded=[True])[0][0]
    assert base == pytest.approx(1.0 + 3.0 - 0.5)  # copy, then the rest of the layer
    short = cost.simulate(*one, 0.0, 1, 1, front=0.5, back=1.0, offloaded=[True],
                          P=np.array([[1.0]]))[0][0]
    assert short == pytest.approx(base)
    # long: front 0.5, CPU 10 ms, then back 1.0
    long = cost.simulate(*one, 0.0, 1, 1, front=0.5, back=1.0, offloaded=[True],
                         P=np.array([[10.0]]))[0][0]
    assert long == pytest.approx(0.5 + 10.0 + 1.0)
    items = cost.intervals(*(v[:, 0] for v in one), 0.0, 1, 1, front=0.5, back=1.0,
                           offloaded=[True], P=np.array([10.0]))
    cpu = [it for it in items if it["lane"] == "cpu"]
    assert len(cpu) == 1 and cpu[0]["start"] == pytest.approx(0.5) and cpu[0]["end"] == pytest.approx(10.5)


def test_the_lp_variables_stay_the_walks():
    """With the lane the LP's variables are x, y per layer and the walk's maxes."""
    import pulp

    c = cost.layer_costs(OPT, FAST, 8, "float16")
    prob = pulp.LpProblem("p", pulp.LpMinimize)
    ops = lanes.LpOps(prob)
    x = [prob.add_variable(f"x{i}", 0, 1) for i in range(3)]
    y = [prob.add_variable(f"y{i}", 0, 1) for i in range(3)]
    st = lp.durations(c, [1024] * 3, x, [0.0] * 3, [0.0] * 3, (False,) * 3, look=1, chunks=2,
                      m=1, streams=[False] * 3, y=y)
    lanes.walk(ops, st)
    names = {v.name for v in prob.variables()}
    assert names - {f"x{i}" for i in range(3)} - {f"y{i}" for i in range(3)} == \
        {f"t{k}" for k in range(ops.count)}


def test_the_forced_fraction():
    """schedule.cpu_attention_fraction: c = round(f * n) everywhere (Plan.cpu_fraction), the
    LP's l beside it never past n - c, and the prediction counts the lane."""
    plan = _plan(cpu_attention_fraction=0.25)
    assert plan.cpu_fraction == 0.25 and plan.cpu == () and plan.cpu_lane
    for s in (1, 100, 1024, 2048):
        for u in range(plan.num_units):
            c = plan.cpu_tokens(u, s, s)
            assert c == round(0.25 * s) and c + plan.recompute_tokens(u, s) <= s
    p = predict(OPT, FAST, plan, 1024, 32, "float16")
    assert p["predicted_step_ms"] == pytest.approx(plan.predicted_step_ms[0])
    assert p["cpu_busy_ms"] == pytest.approx(
        OPT.num_layers * (FAST.cpu_attn_fixed_us * 1e-3 + 256 * cost.layer_costs(
            OPT, FAST, 32, "float16").cpu_per_tok))
    # with a forced recompute fraction too: no LP, both forced
    both = _plan(cpu_attention_fraction=0.25, recompute_fraction=0.5, mode="pipelined")
    assert both.cpu_tokens(0, 1000) == 250 and both.recompute_tokens(0, 1000) == 500
    assert np.all(cpu_table(OPT, both, np.array([1000])) == 250)
    # a machine without a measured lane still plans it (the runtime's tests force it), noted
    none = _plan(hw("h200-pcie5", cpu_attn_gbps=0.0), cpu_attention_fraction=0.25)
    assert none.cpu_lane and "not predicted" in none.notes["cpu_attention"]


def test_the_table_is_runs_shared_with_recompute():
    plan = _plan()
    assert len(plan.cpu) == len(plan.recompute) == len(plan.recompute_from)
    assert len(plan.cpu) < 200  # c moves in whole chunks: runs, not one row a context
    ctx = np.arange(1, 2049)
    table = cpu_table(OPT, plan, ctx)
    for s in (1, 63, 64, 700, 1024, 2048):
        assert [plan.cpu_tokens(u, s, s) for u in range(plan.num_units)] == table[:, s - 1].tolist()
    assert all(x % REQ.chunk_tokens == 0 for row in plan.cpu for x in row)
    assert Plan.from_json(json.loads(plan.dumps())) == plan


def test_lane_plans_that_do_not_fit_the_host_go_without():
    """The lane keeps every pool row; where that does not fit hardware.cpu_mem_gb, auto plans
    without the lane instead of refusing."""
    need_on = host_memory_gb(OPT, _plan(), 32, "float16")
    need_off = host_memory_gb(OPT, _plan(cpu_attention="off"), 32, "float16")
    assert need_off < need_on
    h = hw("h200-pcie5", cpu_attn_gbps=40.0, cpu_mem_gb=(need_on + need_off) / 2)
    plan = _plan(h)
    assert not plan.cpu_lane and "cpu_mem_gb" in plan.notes["cpu_attention"]


def test_the_reports_show_the_lane():
    from kvc.reports.plan import plan_json, plan_text
    from kvc.reports.timeline import chrome_trace, predicted_intervals

    d = plan_json(OPT, FAST, REQ)
    assert all(r["cpu_tokens"] > 0 for r in d["layers"]) and d["cpu_attention"]["lane"]
    assert all(r["cpu_tokens"] + r["recompute_tokens"] + r["kv_tokens"] == 1024 for r in d["layers"])
    assert d["cpu_busy_ms"] > 0 and "cpu" in d["plan"]
    text = plan_text(OPT, FAST, REQ)
    assert "  cpu  " in text and "CPU attention lane:" in text
    off = plan_text(OPT, FAST, REQ.but(cpu_attention="off"))
    assert "CPU attention lane" not in off and "  cpu  " not in off
    items = predicted_intervals(OPT, FAST, make_plan(OPT, FAST, REQ), 1024, 32, "float16")
    assert sum(it["lane"] == "cpu" for it in items) == OPT.num_layers
    trace = chrome_trace(items)
    assert {"cpu"} <= {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}


# --- the manifest ------------------------------------------------------------------------------

TINY = {"model": {"preset": "tiny-opt", "dtype": "float32"}, "hardware": "cpu",
        "workload": {"batch_size": 2, "prompt_len": 8, "gen_len": 8, "max_context": 300}}
# a link slow enough that the tiny model's copies dominate, and a CPU lane that pays
LANE = ["schedule=full_offload", "schedule.cpu_attention=auto", "hardware.h2d_gbps=0.001", "hardware.cpu_attn_gbps=0.001",
        "hardware.cpu_attn_fixed_us=0",
        "hardware.cpu_attn_threads=2", "schedule.chunk_tokens=4"]


@pytest.fixture(scope="module")
def lane_artifact(tmp_path_factory):
    return kvc.compile(TINY, overrides=LANE, output=tmp_path_factory.mktemp("c") / "lane.kvc")


def test_a_plan_with_cpu_rows_round_trips_through_the_manifest(lane_artifact):
    m = art.read_manifest(lane_artifact)
    d = m["plan"]
    assert len(d["cpu"]) == len(d["recompute_runs"]) and d["cpu_threads"] == 2
    assert d["cpu_gbps"] == 0.001  # the rate the LP planned with: the runtime measures against it
    assert any(c > 0 for row in d["cpu"] for c in row)
    plan = Plan.from_json(d)
    assert plan.cpu_lane and Plan.from_json(json.loads(plan.dumps())) == plan
    assert json.loads(plan.dumps()) == json.loads(json.dumps(d, sort_keys=True))
    from kvc.reports.inspect import inspect_text
    assert "cpu lane: on (chosen by the LP at 0.001 GB/s, none while the steps run faster without it)" \
        in inspect_text(lane_artifact)


@pytest.fixture
def unguarded(monkeypatch):
    """An auto plan's lane at every step: its guard never tries a step without it (the
    tiny model's steps on this CPU may well be faster without: lane_guard)."""
    from kvc.runtime import lane_guard
    monkeypatch.setattr(lane_guard, "BLOCK", 10 ** 9)


def test_a_planned_lane_decodes_as_the_reference(lane_artifact, unguarded):
    """The LP's table of CPU tokens (what auto plans: c in whole chunks, moving with s), loaded
    and run end to end on the CPU: the reference's tokens, logits within 1e-5."""
    assert _decode(lane_artifact) > 0  # the CPU attended to some rows


def _decode(artifact, steps=8):
    """The CPU tokens of the last step of the lane artifact's model, loaded from `artifact`,
    whose tokens and logits are checked against the reference decoder's."""
    from kvc.models import build_model, preset
    from kvc.runtime.reference import ReferenceDecoder

    model = kvc.load(artifact, device="cpu")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    tokens, logits = model.generate(ids, steps, return_logits=True)
    spec = preset("tiny-opt")
    ref_tokens, ref_logits = ReferenceDecoder(build_model(spec, "cpu", torch.float32, seed=0), spec).generate(
        ids, steps, return_logits=True)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    return sum(c for _, c in model._cache.cpu_rows.values())


def test_a_paired_lane_runs_the_plans_split_and_a_step_without_it_runs_the_plan_without_it(
        tmp_path, unguarded):
    """A plan pairing the lane with recompute (tiny-opt's second layer) decodes as the
    reference with the plan's c and l at every step (l: the shapes its CUDA graphs were
    captured for). A step without the lane (the guard's arm without it) runs the plan the
    LP makes without the lane (schedule.cpu_attention=off, same machine): its l wherever the
    lane's graph recomputes, nothing (all copied) where it has no recompute nodes."""
    from kvc.runtime.offloaded import OffloadedCache

    paired = kvc.compile(TINY, overrides=["schedule=pipelined", *LANE[1:]], output=tmp_path / "p.kvc")
    plan = Plan.from_json(art.read_manifest(paired)["plan"])
    assert "beside recompute" in plan.notes["cpu_attention"] and plan.bare
    off = kvc.compile(TINY, overrides=["schedule=pipelined", *LANE[1:], "schedule.cpu_attention=off"],
                      output=tmp_path / "off.kvc")
    off = Plan.from_json(art.read_manifest(off)["plan"])
    assert not off.cpu_lane and off.resident == plan.resident
    assert _decode(paired) > 0  # the reference's tokens and logits
    model = kvc.load(paired, device="cpu")
    model.generate(torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1)), 8)
    cache = model._cache
    s = cache.s - 1  # the last step's context
    got = {u: (plan.cpu_tokens(u, s, s), plan.recompute_tokens(u, s), c, cache.bounds[u][-1])
           for u, (_, c) in cache.cpu_rows.items()}
    both = {u: g for u, g in got.items() if g[0] and g[1]}
    assert both, got
    for u, (planned, l_planned, c, l) in both.items():
        assert c == planned and l == l_planned, got
    assert isinstance(cache, OffloadedCache) and cache.guard is not None
    differs = 0
    for u in plan.offloaded_units:
        graph_recomputes = any(row[u] for row in plan.recompute)
        for n in range(8, 300):
            lo, c0, l0 = cache._split(u, n, lane=False)
            assert (lo, c0) == (0, 0)
            assert l0 == (off.recompute_tokens(u, n) if graph_recomputes else 0), (u, n)
            differs += l0 != plan.recompute_tokens(u, n)
    assert differs, "the arm without the lane never differed from the lane's l"


def _edited(src, tmp_path, keys, value):
    a = tmp_path / "x.kvc"
    shutil.copytree(src, a)
    mf = a / "manifest.json"
    m = json.loads(mf.read_text())
    d = m
    for k in keys[:-1]:
        d = d[k]
    if value is KeyError:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value(d) if callable(value) else value
    mf.write_text(json.dumps(m))
    return a


@pytest.mark.parametrize("keys, value, needle", [
    (["plan", "cpu"], "rows", "plan.cpu must hold one row per run"),
    (["plan", "cpu"], lambda p: p["cpu"][:-1], "plan.cpu must hold one row per run"),
    (["plan", "cpu"], lambda p: [[-1] * len(r) for r in p["cpu"]], "plan.cpu rows must hold"),
    (["plan", "cpu"], lambda p: [[10 ** 9] * len(r) for r in p["cpu"]], "plan.cpu rows must hold"),
    (["plan", "cpu"], lambda p: [[r[0] + 1] * len(c) for r, c in zip(p["recompute_runs"], p["cpu"])],
     "exceed its run's first context"),
    (["plan", "bare"], lambda p: p["bare"][:-1], "plan.bare must hold one row per run"),
    (["plan", "bare"], lambda p: [[r[0] + 1] * len(b) for r, b in zip(p["recompute_runs"], p["bare"])],
     "plan.bare rows must hold"),
    (["plan", "cpu_fraction"], 1.5, "plan.cpu_fraction is not null or 0..1"),
    (["plan", "cpu_fraction"], 0.5, "both cpu rows and a cpu_fraction"),
    (["plan", "cpu_threads"], -1, "plan.cpu_threads = -1"),
    (["plan", "cpu_threads"], True, "plan.cpu_threads = True"),
    (["hardware", "cpu_attn_gbps"], -3, "hardware.cpu_attn_gbps = -3"),
    (["plan", "cpu_gbps"], -1, "plan.cpu_gbps = -1"),
    (["plan", "cpu_gbps"], "fast", "plan.cpu_gbps = fast"),
])
def test_damaged_cpu_fields_are_refused_in_one_line(lane_artifact, tmp_path, keys, value, needle):
    a = _edited(lane_artifact, tmp_path, keys, value)
    with pytest.raises(KvcError) as e:
        art.read_manifest(a)
    assert "\n" not in str(e.value) and needle in str(e.value)


def test_config_keys_reach_the_plan():
    from kvc.api import make_plan as api_plan
    from kvc.api import resolve
    from kvc.config import load_config

    # auto by default, under the guard (kvc.config.schema says why)
    assert dataclasses.asdict(load_config(TINY).schedule)["cpu_attention"] == "auto"
    default = [x for x in LANE if "cpu_attention" not in x]
    assert api_plan(resolve(load_config(TINY, default))).cpu_lane
    assert api_plan(resolve(load_config(TINY, LANE))).cpu_lane  # auto
    # a machine without a measured lane (hardware.cpu_attn_gbps 0, the cpu preset's) gets none
    assert not api_plan(resolve(load_config(TINY, [x for x in default if "cpu_attn_gbps" not in x]))).cpu_lane
    off = api_plan(resolve(load_config(TINY, LANE + ["schedule.cpu_attention=off"])))
    assert not off.cpu_lane
    # a forced fraction turns the lane on whatever cpu_attention says
    forced = api_plan(resolve(load_config(TINY, default + ["schedule.cpu_attention_fraction=0.25"])))
    assert forced.cpu_fraction == 0.25 and forced.cpu_lane
