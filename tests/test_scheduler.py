"""Scheduler LP: the paper's closed form, GQA, pipelined vs full_offload, memory errors, Plan I/O."""
import dataclasses
import json
import time
from pathlib import Path

import pytest

from kvc.planner import cost
import yaml

from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.models import PRESETS
from kvc.ir.modes import NAMES as MODES
from kvc.ir.plan import Plan
from kvc.ir.request import PlanRequest
from kvc.reports.plan import plan_json, plan_text
from kvc.planner.scheduler import make_plan, predict

CONF = Path(__file__).resolve().parents[1] / "conf" / "hardware"


def hw(name, **kw):
    base = HardwareConfig.from_dict(yaml.safe_load((CONF / f"{name}.yaml").read_text()))
    return dataclasses.replace(base, **kw)


def plan(spec, h, mode, b=8, P=1024, G=8, **kw):
    """The plan for one workload: it serves contexts up to P + G unless max_context says more
    (the default, null, is the model's maximum positions: tests of it say so)."""
    kw.setdefault("max_context", P + G)
    return make_plan(PRESETS[spec] if isinstance(spec, str) else spec, h, PlanRequest(batch_size=b,
                     prompt_len=P, gen_len=G, dtype="float16", mode=mode, **kw))


@pytest.mark.parametrize("b,P", [(8, 1024), (32, 2048), (4, 4000)])
def test_kvpr_matches_closed_form_on_the_papers_machine(b, P):
    h = hw("a100-pcie4")
    pl = plan("opt-6.7b", h, "kvpr", b=b, P=P, G=16)
    # F: the recompute rate the cost model charges (GEMM FLOPs at the fitted rate plus the
    # elementwise passes), so the closed form and the LP see the same machine
    spec = PRESETS["opt-6.7b"]
    c = cost.layer_costs(spec, h, b, "float16")
    F = cost.recompute_flops(spec, b, 1) / (c.rec_per_tok / 1e3)
    p, B, hid = 2, h.h2d_gbps * 1e9, 4096
    for s in (P, P + 7, P + 16):
        closed = s * p * F / (2 * hid * B + p * F)
        for i in range(pl.num_layers):
            assert abs(pl.recompute_tokens(i, s) - closed) <= pl.chunk_tokens, (s, i)
    assert pl.lookahead == 0 and pl.act_chunks == 1 and not any(pl.resident)


@pytest.mark.parametrize("h", ["a100-pcie4", "h100-pcie5", "h200-pcie5", "cpu"])
def test_gqa_never_recomputes(h):
    spec = PRESETS["llama-3-8b"]
    # memory tight enough that most layers must stream
    m = hw(h, gpu_mem_gb=24.0, cpu_mem_gb=512.0)  # about recompute, not host memory
    for mode in ("pipelined", "kvpr", "full_offload"):
        pl = plan(spec, m, mode, b=32, P=4096, G=64)
        assert all(v == 0 for row in pl.recompute for v in row), mode
        assert not all(pl.resident)


def test_mha_does_recompute_when_link_bound():
    pl = plan("opt-6.7b", hw("h100-pcie5", gpu_mem_gb=24.0), "pipelined", b=32, P=2048)
    assert any(v > 0 for row in pl.recompute for v in row)


def test_pipelined_never_slower_than_full_offload():
    specs = ["opt-1.3b", "opt-6.7b", "opt-30b", "llama-2-7b", "llama-3-8b", "qwen2-7b"]
    checked = 0
    for hname in ("a100-pcie4", "h100-pcie5"):
        for name in specs:
            for b in (1, 16):
                for P in (256, 4000):
                    h = hw(hname)
                    try:
                        fo = plan(name, h, "full_offload", b=b, P=P, G=4)
                    except KvcError:
                        continue  # does not even stream: nothing to compare
                    pi = plan(name, h, "pipelined", b=b, P=P, G=4)
                    for s in range(P, P + 5):
                        a = predict(PRESETS[name], h, pi, s, b, "float16")["predicted_step_ms"]
                        f = predict(PRESETS[name], h, fo, s, b, "float16")["predicted_step_ms"]
                        assert a <= f * (1 + 1e-9), (hname, name, b, s, a, f)
                    checked += 1
    assert checked >= 30


def test_every_context_gets_a_valid_split():
    """Every context from 1 to max_context (the model's 2048 positions by default), not only
    the workload's; the predictions stay one per workload context."""
    pl = plan("opt-6.7b", hw("h100-pcie5", gpu_mem_gb=24.0), "pipelined", b=16, P=100, G=300,
              max_context=None)
    assert pl.max_context == 2048 and pl.context_range == (1, 2048)
    assert len(pl.predicted_step_ms) == 301
    assert len(pl.recompute) == len(pl.recompute_from) < 2048  # runs, not one row a context
    table = pl.recompute_table(range(1, 2049))
    for i in range(pl.num_layers):
        for s, l in enumerate(table[i], 1):
            assert 0 <= l <= s and l % pl.chunk_tokens == 0
            assert l == pl.recompute_tokens(i, s)
    assert any(table[i][-1] > 0 for i in range(pl.num_layers))  # it does recompute here
    assert pl.covers(1) and pl.covers(2048) and not pl.covers(2049)
    with pytest.raises(ValueError, match="covers contexts 1..2048"):
        pl.recompute_tokens(0, 2049)


def test_budget_too_small_to_stream_one_layer_states_the_shortfall():
    spec = PRESETS["opt-6.7b"]
    h = hw("h100-pcie5", gpu_mem_gb=16.0)  # weights 13.3 GB + margin 2 GB: ~0.7 GB left
    with pytest.raises(KvcError, match=r"GB short of streaming even one layer") as e:
        plan(spec, h, "pipelined", b=64, P=8000, G=0)
    short = float(str(e.value).split(": GPU memory is ")[1].split(" GB")[0])
    assert short > 0


def test_weights_alone_too_big():
    # issue 6: weights that do not fit stream from CPU (tests/test_weights.py); only a budget
    # that cannot hold even the non-layer weights and two weight slots is an error
    pl = plan("llama-2-70b", hw("h100-pcie5", cpu_mem_gb=512.0), "full_offload", b=1, P=16, G=0)
    assert 0 < sum(pl.weights_streamed) < 80
    with pytest.raises(KvcError, match="short"):
        plan("llama-2-70b", hw("h100-pcie5", gpu_mem_gb=4.0), "full_offload", b=1, P=16, G=0)


def test_gpu_resident_infeasible_says_how_many_gb():
    with pytest.raises(KvcError, match=r"gpu_resident does not fit: needs [\d.]+ GB more"):
        plan("opt-30b", hw("h100-pcie5"), "gpu_resident", b=8, P=4096, G=64)


def test_recompute_disabled_when_activation_staging_does_not_fit():
    spec = PRESETS["opt-6.7b"]
    h = hw("h100-pcie5", gpu_mem_gb=17.7)
    pl = plan(spec, h, "pipelined", b=16, P=4096, G=0)
    assert "recompute_disabled" in pl.notes
    assert all(v == 0 for row in pl.recompute for v in row)


def test_plan_round_trips_through_json():
    pl = plan("opt-6.7b", hw("h100-pcie5", gpu_mem_gb=24.0), "pipelined", b=16, P=512, G=40)
    back = Plan.from_json(json.loads(json.dumps(pl.to_json())))
    assert back == pl
    forced = plan("opt-1.3b", hw("a100-pcie4"), "kvpr", recompute_fraction=0.5)
    assert Plan.from_json(json.loads(forced.dumps())) == forced
    assert forced.recompute_tokens(3, 1000) == 500 and forced.predicted_step_ms


def test_predict_breakdown_is_consistent():
    spec, h = PRESETS["opt-6.7b"], hw("h100-pcie5", gpu_mem_gb=24.0)
    pl = plan(spec, h, "pipelined", b=16, P=1024)
    d = predict(spec, h, pl, 1030, 16, "float16")
    assert d["predicted_step_ms"] == pytest.approx(pl.predicted_step_ms[6])
    assert d["gpu_busy_ms"] <= d["predicted_step_ms"] and d["link_busy_ms"] <= d["predicted_step_ms"]
    assert d["gpu_idle_ms"] == pytest.approx(d["predicted_step_ms"] - d["gpu_busy_ms"])
    with pytest.raises(KvcError, match="batch"):
        predict(spec, h, pl, 1030, 4, "float16")


def test_bad_mode_is_a_kvc_error():
    with pytest.raises(KvcError, match="schedule.mode"):
        plan("tiny-opt", hw("cpu"), "fastest")


def test_plan_json_keys_and_modes():
    spec, h = PRESETS["opt-30b"], hw("h100-pcie5")
    kw = dict(batch_size=8, prompt_len=4096, gen_len=16, dtype="float16", mode="pipelined",
              chunk_tokens=64, act_chunks=4)
    req = PlanRequest(**kw)
    d = plan_json(spec, h, req, context=4100)
    assert len(d["layers"]) == spec.num_layers and d["context"] == 4100
    for r in d["layers"]:
        assert r["recompute_tokens"] + r["kv_tokens"] + r["gpu_tokens"] == 4100
    assert set(d["modes"]) == set(MODES)
    assert d["modes"]["gpu_resident"]["predicted_step_ms"] is None
    assert "GB more" in d["modes"]["gpu_resident"]["infeasible"]
    assert d["modes"]["pipelined"]["predicted_step_ms"] == d["predicted_step_ms"]
    json.dumps(d)
    text = plan_text(spec, h, req)
    assert "link busy" in text and "full_offload" in text and "infeasible" in text
    assert plan_json(spec, h, req, context=10)["context"] == 10  # any context the plan serves
    with pytest.raises(KvcError, match=r"--context 4113: the plan covers contexts 1\.\.4112"):
        plan_json(spec, h, req, context=4113)  # opt-30b's 2048 positions < the workload's 4112
    with pytest.raises(KvcError, match="--context 0"):
        plan_json(spec, h, req, context=0)


def test_tiny_presets_plan_on_cpu():
    for name in ("tiny-opt", "tiny-llama", "tiny-llama-gqa"):
        for mode in MODES:
            pl = plan(name, hw("cpu"), mode, b=2, P=8, G=8, max_context=None)
            assert pl.max_context == PRESETS[name].max_positions, (name, mode, pl.notes)
            assert pl.covers(1) and pl.covers(pl.max_context) and len(pl.predicted_step_ms) == 9
            assert all(pl.recompute_tokens(u, s) >= 0 for u in range(pl.num_units)
                       for s in (1, 8, 16, pl.max_context))


def _timed_plan(spec, h, req):
    """(plan, seconds) with the model's host-node rows derived beforehand: those lower small
    probe models once per model structure and process (kvc.compiler.host_counts), which is the
    compiler's cost, timed apart."""
    from kvc.planner.host import host_rows

    t = time.perf_counter()
    for graphed in (False, True):
        host_rows(spec, graphed, req.micro_batches > 1)
    rows_s = time.perf_counter() - t
    t = time.perf_counter()
    pl = make_plan(spec, h, req)
    return pl, time.perf_counter() - t, rows_s


@pytest.mark.parametrize("cpu_gbps", [0.0, 50.0], ids=["no-cpu-lane", "cpu-lane"])
def test_32_layer_8192_context_solve_time(capsys, cpu_gbps):
    """Issue 15: planning every context 1..8192 of a 32-layer multi-head model (it recomputes,
    so the LP's buckets are solved) takes well under 2 s on the 2-core CI machine; issue 17:
    also with the CPU attention lane (its buckets solved again, with y_i)."""
    spec = dataclasses.replace(PRESETS["llama-2-7b"], max_positions=8192)
    # most layers offloaded: the split matters
    h = hw("h200-pcie5", gpu_mem_gb=40.0, cpu_attn_gbps=cpu_gbps)
    req = PlanRequest(batch_size=16, prompt_len=1024, gen_len=32, dtype="float16",
                      mode="pipelined", max_context=8192, cpu_attention="auto")
    pl, dt, rows_s = _timed_plan(spec, h, req)
    msg = (f"[solve time] llama-2-7b (32 layers), contexts 1..8192, pipelined, cpu lane "
           f"{cpu_gbps:g} GB/s: {dt:.3f} s "
           f"({len(pl.notes.get('buckets', []))} bucket LPs per plan, {len(pl.recompute)} runs; "
           f"host-node rows derived once before it: {rows_s:.3f} s)")
    with capsys.disabled():
        print("\n" + msg)
    assert pl.context_range == (1, 8192) and len(pl.predicted_step_ms) == 33
    assert any(l > 0 for row in pl.recompute for l in row)
    # the lane's LP ran too
    assert (cpu_gbps > 0) == pl.notes.get("cpu_attention", "").startswith("auto:")
    # with the lane a run is 3 rows (l, c and l without the lane, Plan.bare) and c moves in
    # chunks too: one run a context would be ~2.4 MB
    assert len(json.dumps(pl.to_json())) < (100_000 if cpu_gbps == 0 else 600_000), \
        "the manifest's table is not compact"
    assert dt < 2.0, msg


def test_80_layer_4096_token_solve_time(capsys):
    spec = PRESETS["llama-2-70b"]
    h = hw("h200-pcie5", gpu_mem_gb=160.0)  # weights stream in issue 6; here they must fit
    pl, dt, rows_s = _timed_plan(spec, h, PlanRequest(batch_size=16, prompt_len=1, gen_len=4096,
                                                      dtype="float16", mode="pipelined"))
    msg = (f"[solve time] llama-2-70b (80 layers), contexts 1..4097, pipelined: {dt:.3f} s "
           f"({len(pl.notes.get('buckets', []))} bucket LPs per plan; host-node rows derived once "
           f"before it: {rows_s:.3f} s)")
    with capsys.disabled():
        print("\n" + msg)
    assert pl.context_range == (1, 4097) and len(pl.predicted_step_ms) == 4097
    assert dt < 3.0, msg


def test_host_memory_budget_is_checked_before_any_allocation():
    from kvc.errors import KvcError

    h = hw("h100-pcie5", gpu_mem_gb=24.0, cpu_mem_gb=8.0)
    with pytest.raises(KvcError, match=r"pinned CPU pools need [\d.]+ GB, more than hardware.cpu_mem_gb = 8"):
        plan("opt-6.7b", h, "full_offload", b=32, P=1024)
    plan("opt-6.7b", hw("h100-pcie5", gpu_mem_gb=24.0, cpu_mem_gb=64.0), "full_offload", b=32, P=1024)


# --- sliding windows: each layer priced at the tokens it reads ----------------------------------

def _windowed(name="tiny-opt", **kw):
    return dataclasses.replace(PRESETS[name], sliding_window=8, **kw)


def test_a_window_layer_is_priced_at_its_window():
    """Layer 0 attends through a window of 8 (7 cached tokens), layer 1 to everything: on a
    link slow enough to recompute, layer 0's l and its predicted copy bytes stay within its
    window as the context grows, while layer 1's grow with it."""
    import numpy as np

    from kvc.planner.evaluate import copy_bytes

    spec = _windowed(window_layers=(0,))
    assert [spec.cached_tokens(i, 100) for i in range(2)] == [7, 100]
    assert (cost.layer_contexts(spec, np.array([3, 100])) == [[3, 7], [3, 100]]).all()
    h = hw("h100-pcie5", h2d_gbps=2.0, launch_us=0, link_latency_us=0, attn_fixed_us=0,
           gemm_half_rows=0)
    P, G, b = 64, 192, 64
    for mode in ("kvpr", "pipelined"):
        pl = plan(spec, h, mode, b=b, P=P, G=G, chunk_tokens=1, resident_cache=False)
        ctx = np.arange(P, P + G + 1)
        l = np.array(pl.recompute_table(ctx))  # [units, contexts]
        assert (l[0] <= 7).all() and (l[1] <= ctx).all()
        assert l[1].max() > 7  # layer 1 recomputes beyond what layer 0 could
        moved = copy_bytes(spec, pl, ctx, l, b, "float16")
        assert moved[0].max() <= cost.kv_bytes(spec, b, 7, 2)  # bounded by the window
        assert moved[1, -1] > moved[1, 0] > moved[0].max()
        step = predict(spec, h, pl, P + G, b, "float16")
        assert step["h2d_bytes"] == moved[:, -1].sum()
    # without the window, layer 0 is layer 1's twin
    full = plan("tiny-opt", h, "kvpr", b=b, P=P, G=G, chunk_tokens=1, resident_cache=False)
    assert max(row[0] for row in full.recompute) > 7


def test_window_staging_and_pools_stop_growing_past_the_window():
    """Every layer windowed (Mistral's way): the staging slots, the attention workspace and
    the CPU pools are sized by the window, not the context."""
    spec = _windowed()
    h = hw("h100-pcie5")
    short, long = (cost.memory_terms(spec, h, 8, s, "float16", 2, True) for s in (100, 5000))
    assert short["staging_gb"] == long["staging_gb"] and short["workspace_gb"] == long["workspace_gb"]
    assert long["layer_kv_gb"] > short["layer_kv_gb"]  # a resident layer keeps every row
    from kvc.planner.memory import host_memory_gb

    pools = [host_memory_gb(spec, plan(spec, h, "full_offload", b=8, P=P, G=16,
                                       resident_cache=False), 8, "float16") for P in (64, 1024)]
    assert pools[0] == pools[1] > 0


@pytest.mark.parametrize("window_layers", [(0,), ()])
def test_window_pools_are_what_the_runtime_allocates(window_layers):
    """The host check counts a windowed plan's pools to the byte (runtime/offloaded.py keeps
    the rows each unit's contexts read, one pool shape for all units)."""
    import torch

    from kvc.ir.plan import forced_plan
    from kvc.planner.memory import host_memory_gb
    from kvc.runtime.offloaded import OffloadedCache

    spec = _windowed(window_layers=window_layers)
    slow = hw("cpu", h2d_gbps=0.001, host_module_us=0.0, host_op_us=0.0, host_view_us=0.0,
              host_kvc_us=0.0)
    plans = [forced_plan("pipelined", 2, 16, 8, 64, f) for f in (0.0, 0.5, 1.0)]
    plans += [make_plan(spec, slow, PlanRequest(batch_size=2, prompt_len=16, gen_len=8,
                        dtype="float32", mode=mode, chunk_tokens=k, max_context=24))
              for mode, k in (("pipelined", 4), ("kvpr", 1))]
    for pl in plans:
        c = OffloadedCache(pl, num_layers=pl.num_units, batch=2, max_tokens=24,
                           act_width=spec.hidden_size, num_kv_heads=spec.num_kv_heads,
                           head_dim=spec.head_dim, dtype=torch.float32, device=torch.device("cpu"),
                           num_events=0, windows=tuple(spec.window(u) for u in range(2)))
        assert c.host_bytes == round(host_memory_gb(spec, pl, 2, "float32") * 1e9), pl


def test_lp_keeps_the_most_on_the_gpu_among_equal_steps():
    """Where the step is flat in how much cache stays resident (the GPU binds at the longest
    context), the LP keeps the most it can: here the budget holds every layer, and a plan that
    streams some of them anyway would only move bytes (the hand LP returned 21 of 32)."""
    from kvc.ir.request import PlanRequest

    h = hw("h100-pcie5", gpu_mem_gb=80.0)
    req = PlanRequest(batch_size=8, prompt_len=512, gen_len=8, dtype="float16", max_context=520)
    p = make_plan(PRESETS["opt-6.7b"], h, req)
    assert all(p.resident)
    bare = make_plan(PRESETS["opt-6.7b"], h, req.but(resident_cache=False))
    assert sum(p.predicted_step_ms) < sum(bare.predicted_step_ms)
