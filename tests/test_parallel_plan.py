"""Several GPUs, a batch split (issue 18): the config, the per-rank machine, the request, the
Plan of one rank, its prediction (the rank's step plus the logits all-gather), the reports and
the profiler's arithmetic. No GPU and no torch.distributed needed."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from kvc_fixtures import hw as preset_hw

from kvc.api import resolve
from kvc.cli import main
from kvc.config import load_config
from kvc.config.validate import from_dict, hardware_from_dict
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig, per_rank
from kvc.ir.plan import Plan
from kvc.ir.request import PlanRequest
from kvc.models import PRESETS
from kvc.planner.evaluate import gather_ms
from kvc.planner.scheduler import make_plan, predict, search_policy

# the first benchmark: OPT-6.7B b32 s1024 pipelined on the H200 preset, every layer's
# cache offloaded (as the bench's GPU budget forces it): the link sets the step
OPT = {"model": {"preset": "opt-6.7b", "dtype": "float16"}, "hardware": "h200-pcie5",
       "workload": {"batch_size": 32, "prompt_len": 1024, "gen_len": 32, "max_context": 1056},
       "schedule": {"mode": "pipelined", "resident_cache": False}}
TINY = {"model": {"preset": "tiny-opt", "dtype": "float32"}, "hardware": "cpu",
        "workload": {"batch_size": 8, "prompt_len": 16, "gen_len": 4, "max_context": 20}}


# --- the machine a rank sees -------------------------------------------------------------------

def test_per_rank_shares_the_host_link_and_the_pinned_memory():
    hw = HardwareConfig(h2d_gbps=56.5, d2h_gbps=54.0, bidir_gbps=50.0, cpu_mem_gb=128.0,
                        host_link_gbps=156.0)
    assert per_rank(hw, 1) is hw
    two = per_rank(hw, 2)  # 78 GB/s each: above every link, which keep their rates
    assert (two.h2d_gbps, two.d2h_gbps, two.bidir_gbps, two.cpu_mem_gb) == (56.5, 54.0, 50.0, 64.0)
    four = per_rank(hw, 4)  # 39 GB/s each: the host's limit
    assert (four.h2d_gbps, four.d2h_gbps, four.bidir_gbps, four.cpu_mem_gb) == (39.0, 39.0, 39.0, 32.0)
    assert per_rank(four, 4).h2d_gbps == 39.0  # the rates are idempotent
    # 0: no shared limit known, each GPU keeps its own rates; the memory is still shared
    free = per_rank(dataclasses.replace(hw, host_link_gbps=0.0), 4)
    assert (free.h2d_gbps, free.bidir_gbps, free.cpu_mem_gb) == (56.5, 50.0, 32.0)
    # nothing else changes
    assert dataclasses.replace(four, h2d_gbps=56.5, d2h_gbps=54.0, bidir_gbps=50.0,
                               cpu_mem_gb=128.0) == hw


def test_per_rank_shares_the_cpu_lane():
    """Every rank's CPU attention lane runs at once on one host: the cores and the rate are
    shared, and a rank left without a thread gets no lane."""
    hw = HardwareConfig(cpu_mem_gb=128.0, cpu_attn_gbps=40.0, cpu_attn_threads=14)
    two, four = per_rank(hw, 2), per_rank(hw, 4)
    assert (two.cpu_attn_threads, two.cpu_attn_gbps) == (7, 20.0)
    assert (four.cpu_attn_threads, four.cpu_attn_gbps) == (3, 10.0)
    assert per_rank(dataclasses.replace(hw, cpu_attn_threads=3), 4).cpu_attn_gbps == 0.0
    assert per_rank(HardwareConfig(), 4).cpu_attn_gbps == 0.0  # no lane stays none
    # a llama-3-8b row split over 4 ranks on the H200 host (h200-pcie5: 14 threads): each
    # rank's lane is planned at its share of the rate and carries its share of the threads
    h200 = preset_hw("h200-pcie5")
    plan = make_plan(PRESETS["llama-3-8b"], h200,
                     PlanRequest(batch_size=32, prompt_len=2048, gen_len=4, dtype="float16",
                                 resident_cache=False, max_context=2064, world_size=4,
                                 cpu_attention="auto"))
    assert plan.cpu_lane and plan.cpu_threads == 3
    par = plan.notes["parallel"]
    assert (par["cpu_attn_threads"], par["cpu_attn_gbps"]) == (3, round(h200.cpu_attn_gbps / 4, 4))
    one = make_plan(PRESETS["llama-3-8b"], preset_hw("h200-pcie5"),
                    PlanRequest(batch_size=8, prompt_len=2048, gen_len=4, dtype="float16",
                                resident_cache=False, max_context=2064, cpu_attention="auto"))
    assert one.cpu_threads == 14  # one rank of batch 8 alone on the host: all the lane's threads


def test_hardware_fields_are_checked():
    assert hardware_from_dict({"host_link_gbps": 156, "collective_us": 0}, "hw").host_link_gbps == 156.0
    for bad, needle in (({"host_link_gbps": -1}, "hardware.host_link_gbps = -1.0"),
                        ({"collective_gbps": 0}, "hardware.collective_gbps = 0.0"),
                        ({"collective_us": -5}, "hardware.collective_us = -5.0")):
        with pytest.raises(KvcError, match=needle.replace(".", r"\.")):
            hardware_from_dict(bad, "hw")


def test_the_h200_preset_knows_its_host_limit():
    hw = load_config(OPT).hardware
    assert hw.host_link_gbps == 156.0
    assert per_rank(hw, 4).h2d_gbps == 39.0 and per_rank(hw, 2).h2d_gbps == hw.h2d_gbps == 56.5


# --- config and request ------------------------------------------------------------------------

def test_world_size_from_the_command_line_and_the_model_yaml(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps({**OPT, "parallel": {"world_size": 2}}))
    assert load_config(path).parallel.world_size == 2
    assert load_config(path, ["parallel.world_size=4"]).parallel.world_size == 4
    assert load_config(OPT).parallel.world_size == 1
    assert PlanRequest.from_config(load_config(OPT, ["parallel.world_size=4"])).world_size == 4
    for value in (0, 1025):
        with pytest.raises(KvcError) as e:
            load_config(OPT, [f"parallel.world_size={value}"])
        assert str(e.value) == f"parallel.world_size = {value}: expected an integer 1..1024"
    # a manifest's config from before issue 18 has no parallel section
    old = load_config(OPT).to_dict()
    del old["parallel"]
    assert from_dict(old).parallel.world_size == 1


def test_request_rank_batch_and_its_refusals():
    base = PlanRequest(batch_size=32, prompt_len=8, gen_len=2, dtype="float16")
    assert base.world_size == 1 and base.rank_batch == 32
    assert base.but(world_size=4).rank_batch == 8
    assert base.but(batch_size=30, world_size=4).rank_batch == 8  # 8 + 8 + 8 + 6, padded
    assert base.but(world_size=4, micro_batches=4).rank_batch == 8
    with pytest.raises(KvcError) as e:
        base.but(batch_size=2, world_size=4)
    assert "\n" not in str(e.value) and "parallel.world_size = 4" in str(e.value) \
        and "workload.batch_size = 2" in str(e.value)
    with pytest.raises(KvcError) as e:  # 32 / 4 = 8 rows per rank, not a multiple of 16
        base.but(world_size=4, micro_batches=16)
    msg = str(e.value)
    assert "\n" not in msg
    assert all(k in msg for k in ("workload.batch_size = 32", "parallel.world_size = 4",
                                  "workload.num_gpu_batches = 16"))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(KvcError, match="parallel.world_size"):
            base.but(world_size=bad)


# --- the plan of one rank ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def opt_plans():
    """Each rank's plan without the CPU lane: these tests are of the link each rank shares
    (the lane's per-rank share: test_per_rank_shares_the_cpu_lane)."""
    out = {}
    for n in (1, 2, 4):
        r = resolve(load_config(OPT, [f"parallel.world_size={n}", "schedule.cpu_attention=off"]))
        out[n] = (r, make_plan(r.spec, r.hardware, r.request))
    return out


def test_rank_plans_are_smaller_and_faster(opt_plans):
    one, two, four = (opt_plans[n][1] for n in (1, 2, 4))
    assert (one.world_size, one.batch_size) == (1, 32)
    assert (two.world_size, two.batch_size) == (2, 16)
    assert (four.world_size, four.batch_size) == (4, 8)
    assert "parallel" not in one.notes
    for a, b in ((one, two), (two, four)):
        assert all(x < y for x, y in zip(b.predicted_step_ms, a.predicted_step_ms))


def test_four_ranks_are_planned_at_the_host_limit(opt_plans):
    r, plan = opt_plans[4]
    assert plan.notes["parallel"]["h2d_gbps"] == 39.0 and r.hardware.h2d_gbps == 56.5
    assert opt_plans[2][1].notes["parallel"]["h2d_gbps"] == 56.5
    s = r.request.prompt_len
    at_limit = predict(r.spec, r.hardware, plan, s, 32, "float16")
    assert at_limit["predicted_step_ms"] == pytest.approx(plan.predicted_step_ms[0], rel=1e-6)
    # the same plan on a host without the shared limit moves its bytes faster: the 39 counted
    unlimited = dataclasses.replace(r.hardware, host_link_gbps=0.0)
    free = predict(r.spec, unlimited, plan, s, 32, "float16")
    assert at_limit["h2d_bytes"] == free["h2d_bytes"] > 0
    assert at_limit["link_busy_ms"] == pytest.approx(free["link_busy_ms"] * 56.5 / 39.0, rel=0.05)
    assert at_limit["predicted_step_ms"] > 1.2 * free["predicted_step_ms"]  # link-bound


def test_the_gather_is_in_the_step_once(opt_plans):
    r, plan = opt_plans[4]
    g = gather_ms(r.spec, r.hardware, 4, 8, "float16")
    # 30 us + 3 ranks' 8 rows of 50272 fp16 logits at 50 GB/s
    assert g == pytest.approx(0.030 + 3 * 8 * 50272 * 2 / 50e9 * 1e3)
    assert gather_ms(r.spec, r.hardware, 1, 32, "float16") == 0.0
    pred = predict(r.spec, r.hardware, plan, 1024, 32, "float16")
    assert pred["gather_ms"] == pytest.approx(g)
    alone = predict(r.spec, per_rank(r.hardware, 4), dataclasses.replace(plan, world_size=1), 1024,
                    8, "float16")
    assert "gather_ms" not in alone
    assert pred["predicted_step_ms"] - alone["predicted_step_ms"] == pytest.approx(g, abs=1e-4)
    assert plan.notes["parallel"]["gather_ms"] == pytest.approx(g, abs=1e-6)
    # the rank's batch or the whole batch; another batch is refused
    assert predict(r.spec, r.hardware, plan, 1024, 8, "float16") == pred
    with pytest.raises(KvcError, match="per rank of 4"):
        predict(r.spec, r.hardware, plan, 1024, 64, "float16")


def test_plan_json_round_trip(opt_plans):
    plan = opt_plans[4][1]
    d = plan.to_json()
    assert d["world_size"] == 4
    assert Plan.from_json(json.loads(json.dumps(d))) == plan
    one = opt_plans[1][1].to_json()
    assert "world_size" not in one  # one-GPU manifests stay as they were
    assert Plan.from_json(one).world_size == 1


def test_search_policy_splits_each_batch():
    r = resolve(load_config(TINY, ["parallel.world_size=4"]))
    tried = []
    plan, tps = search_policy(r.spec, r.hardware, r.request, batch_sizes=[2, 8], tried=tried,
                              micro_batches=(1, 2))
    assert plan.world_size == 4
    assert {(t["batch"], t["micro_batches"]) for t in tried} == {(8, 1), (8, 2)}  # 2 < 4 ranks
    best = max(tried, key=lambda t: t.get("tokens_per_s", 0))
    assert plan.batch_size == 2 and tps == best["tokens_per_s"]
    assert tps == pytest.approx(8 * len(plan.predicted_step_ms) / (sum(plan.predicted_step_ms) / 1e3))
    with pytest.raises(KvcError, match="world_size = 4"):
        search_policy(r.spec, r.hardware, r.request, batch_sizes=[1, 2])


# --- reports -----------------------------------------------------------------------------------

def test_kvc_plan_json_carries_the_world_size(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps(OPT))
    assert main(["plan", str(path), "parallel.world_size=4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["world_size"], d["rank_batch"], d["batch_size"]) == (4, 8, 32)
    assert d["plan"]["world_size"] == 4 and d["plan"]["batch_size"] == 8
    assert d["gather_ms"] > 0 and d["parallel"]["h2d_gbps"] == 39.0
    assert d["gather_ms"] == d["parallel"]["gather_ms"]
    assert "parallel" not in d["notes"]


def test_kvc_plan_text_says_the_split(capsys):
    r = resolve(load_config(TINY, ["parallel.world_size=3"]))
    from kvc.reports.plan import plan_json, plan_text

    text = plan_text(r.spec, r.hardware, r.request)
    d = plan_json(r.spec, r.hardware, r.request)
    assert "batch 8 over 3 GPUs, 3 rows per rank (1 padding)" in text
    assert f"H2D {r.hardware.h2d_gbps:g} GB/s" in text
    assert f"logits all-gather after the step: {d['gather_ms']:.3f} ms" in text
    one = resolve(load_config(TINY))
    assert "world size" not in plan_text(one.spec, one.hardware, one.request)
    assert "world_size" not in plan_json(one.spec, one.hardware, one.request)


def test_timeline_ends_with_the_gather():
    from kvc.reports.timeline import predicted_intervals

    r = resolve(load_config(TINY, ["parallel.world_size=2"]))
    plan = make_plan(r.spec, r.hardware, r.request)
    items = predicted_intervals(r.spec, r.hardware, plan, 16, 8, "float32")
    last = max(items, key=lambda it: it["end"])
    assert last["kind"] == "gather"
    assert last["end"] - last["start"] == pytest.approx(gather_ms(r.spec, r.hardware, 2, 4, "float32"))


# --- the profiler's arithmetic (no GPU here) ---------------------------------------------------

def test_summed_rate_over_the_common_span():
    from kvc.profiler.measure import summed_gbps

    # four GPUs, 1 GB each, the last done 25.6 ms after the start: 156 GB/s together
    assert summed_gbps([10 ** 9] * 4, 1.0, [1.02, 1.0256, 1.025, 1.01]) == pytest.approx(156.25)
    with pytest.raises(ValueError):
        summed_gbps([1], 2.0, [2.0])


def test_one_gpu_or_a_cpu_measures_no_host_limit(monkeypatch):
    import torch

    from kvc.profiler import measure

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert measure._several_gpus(measure._Timer("cpu")) == {}
    assert HardwareConfig().host_link_gbps == 0.0


def test_a_four_gpu_profile_would_report_the_summed_rate(monkeypatch):
    """The threads, barrier and arithmetic of host_link_gbps, with the copies faked."""
    import time

    import torch

    from kvc.profiler import measure

    class FakeStream:
        def __init__(self, device=None):
            self.device = device

        def synchronize(self):
            pass

    class FakeTensor:
        def copy_(self, src, non_blocking=False):
            time.sleep(0.002)  # 1e6 bytes in 2 ms: 0.5 GB/s per device, at most

    monkeypatch.setattr(torch.cuda, "device", lambda d: _nothing())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: _nothing())
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: FakeTensor())
    rate = measure.host_link_gbps([0, 1, 2, 3], nbytes=10 ** 6, copies=2, rounds=1)
    assert 0 < rate <= 4 * 0.5


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_artifact_bounds_the_world_size(tmp_path):
    from kvc.api import compile_artifact
    from kvc.artifact import read_manifest
    from kvc.reports.inspect import inspect_text

    art = compile_artifact(TINY, ["parallel.world_size=2"], output=tmp_path / "a.kvc")
    m = read_manifest(art)
    assert m["plan"]["world_size"] == 2 and m["config"]["parallel"]["world_size"] == 2
    assert "world size 2" in inspect_text(art)
    path = art / "manifest.json"
    d = json.loads(path.read_text())
    for bad in (0, 1025, "2"):
        d["plan"]["world_size"] = bad
        path.write_text(json.dumps(d))
        with pytest.raises(KvcError, match="plan.world_size"):
            read_manifest(art)
    d["plan"]["world_size"] = 4  # not what the config says
    path.write_text(json.dumps(d))
    with pytest.raises(KvcError, match="parallel.world_size"):
        read_manifest(art)


def test_evaluate_arrays_adds_the_gather_per_context(opt_plans):
    from kvc.planner.evaluate import evaluate

    r, plan = opt_plans[2]
    rank_hw = per_rank(r.hardware, 2)
    ctx = np.array([1024, 1040])
    with_g = evaluate(r.spec, rank_hw, plan, ctx, 16, "float16")[0]
    without = evaluate(r.spec, rank_hw, dataclasses.replace(plan, world_size=1), ctx, 16, "float16")[0]
    assert np.allclose(with_g - without, gather_ms(r.spec, rank_hw, 2, 16, "float16"))


# --- a token split (parallel.split tokens): one long context over several GPUs ----------------

# the long-context row: a Llama-3.1-8B shape (128k positions) at context 65,536, batch
# 1, every layer's cache offloaded (llama-3-8b's 8192 positions refuse this workload)
LONG = {"model": {"preset": "llama-3.1-8b", "dtype": "float16"}, "hardware": "h200-pcie5",
        "workload": {"batch_size": 1, "prompt_len": 65536, "gen_len": 32, "max_context": 65568},
        "schedule": {"mode": "pipelined", "resident_cache": False}}


def test_split_from_the_config_and_its_one_line_refusals():
    assert load_config(OPT).parallel.split == "rows"
    cfg = load_config(LONG, ["parallel.world_size=4", "parallel.split=tokens"])
    req = PlanRequest.from_config(cfg)
    assert (req.split, req.world_size, req.rank_batch, req.tokens) == ("tokens", 4, 1, True)
    with pytest.raises(KvcError) as e:
        load_config(LONG, ["parallel.split=columns"])
    msg = str(e.value)
    assert "\n" not in msg and "parallel.split = 'columns'" in msg and "rows" in msg and "tokens" in msg
    base = PlanRequest(batch_size=1, prompt_len=8, gen_len=2, dtype="float16")
    with pytest.raises(KvcError, match="parallel.split"):
        base.but(split="cols")
    # rows with more ranks than rows: the refusal suggests the token split
    with pytest.raises(KvcError) as e:
        base.but(world_size=2)
    assert "parallel.split=tokens" in str(e.value) and "\n" not in str(e.value)
    # tokens: more ranks than rows, every rank has every row, micro-batches divide the batch
    assert base.but(world_size=8, split="tokens").rank_batch == 1
    assert base.but(batch_size=6, world_size=4, split="tokens", micro_batches=2).rank_batch == 6
    with pytest.raises(KvcError, match="workload.num_gpu_batches"):
        base.but(batch_size=6, world_size=4, split="tokens", micro_batches=4)
    for bad, needle in (({"mode": "gpu_resident"}, "schedule.mode = gpu_resident"),
                        ({"cpu_attention_fraction": 0.5}, "schedule.cpu_attention_fraction = 0.5")):
        with pytest.raises(KvcError) as e:
            base.but(world_size=2, split="tokens", **bad)
        assert needle in str(e.value) and "\n" not in str(e.value)
    # one GPU ignores the split
    assert base.but(split="tokens").rank_batch == 1 and not base.but(split="tokens").tokens


def test_one_gpu_ignores_the_split():
    r = resolve(load_config(TINY))
    t = resolve(load_config(TINY, ["parallel.split=tokens"]))
    a, b = (make_plan(x.spec, x.hardware, x.request) for x in (r, t))
    assert b.split == "rows" and "split" not in b.to_json()
    assert dataclasses.replace(a, notes={}) == dataclasses.replace(b, notes={})


@pytest.fixture(scope="module")
def long_plans():
    out = {}
    # without the CPU lane (a token split plans none), so one GPU's bytes are the ranks' sum
    for n, split in ((1, "rows"), (2, "tokens"), (4, "tokens")):
        r = resolve(load_config(LONG, [f"parallel.world_size={n}", f"parallel.split={split}",
                                       "schedule.cpu_attention=off"]))
        out[n] = (r, make_plan(r.spec, r.hardware, r.request))
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_a_token_plan_is_one_ranks_over_its_share(long_plans, n):
    r, plan = long_plans[n]
    share = -(-65568 // n) + 1
    assert (plan.split, plan.world_size, plan.batch_size, plan.context_shares) == ("tokens", n, 1, n)
    assert plan.max_context == share and plan.context_range == (1, share)
    assert all(plan.covers(m) for m in (1, share // 2, share))
    assert [plan.recompute_tokens(u, share) for u in plan.offloaded_units]  # answers the last
    assert (plan.prompt_len, plan.gen_len) == (65536 // n, 65568 // n - 65536 // n)
    assert len(plan.predicted_step_ms) == plan.gen_len + 1
    assert not any(plan.resident) and not plan.cpu_lane
    par = plan.notes["parallel"]
    assert (par["split"], par["prompt_len"], par["gen_len"], par["max_context"]) == \
        ("tokens", 65536, 32, 65568)
    # the pools are a full replica: every row of the whole context, K,V and activations
    from kvc.planner.memory import host_memory_gb
    from kvc.planner.sizes import act_bytes, kv_bytes

    assert plan.pool_context >= 65568
    per_layer = kv_bytes(r.spec, 1, plan.pool_context, 2) + act_bytes(r.spec, 1, plan.pool_context, 2)
    assert host_memory_gb(r.spec, plan, 1, "float16") == pytest.approx(32 * per_layer / 1e9)
    # faster than one GPU, at every context of the workload
    one = long_plans[1][1]
    for s in (65536, 65568):
        a = predict(r.spec, r.hardware, plan, s, 1, "float16")
        b = predict(r.spec, r.hardware, one, s, 1, "float16")
        assert a["predicted_step_ms"] < b["predicted_step_ms"]
        assert a["share_context"] == -(-s // n) and a["h2d_bytes"] * n == pytest.approx(b["h2d_bytes"], rel=1e-3)
    assert max(plan.predicted_step_ms) < min(one.predicted_step_ms)


def test_the_per_layer_merge_is_in_the_step(long_plans):
    """Raising collective_us by 1 ms: once the compute lane binds, the step grows by a merge
    per offloaded layer and the token broadcast (33 ms); at the default 30 us the link binds
    and the merges run under the next layers' copies (only the last one and the broadcast
    show)."""
    r, plan = long_plans[2]

    def step(us):
        hw = dataclasses.replace(r.hardware, collective_us=us)
        return predict(r.spec, hw, plan, 65536, 1, "float16")["predicted_step_ms"]

    assert step(4000) - step(3000) == pytest.approx((32 + 1) * 1.0, rel=1e-6)
    assert step(1000) - step(30) == pytest.approx(2 * 0.97, rel=1e-6)
    pred = predict(r.spec, r.hardware, plan, 65536, 1, "float16")
    merge = 0.030 + 1 * 1 * 32 * 129 * 4 / 50e9 * 1e3  # the all-gather alone
    assert merge < pred["merge_ms"] < merge + 0.02  # and the merge's small elementwise cost
    assert pred["merges_ms"] == pytest.approx(32 * pred["merge_ms"])
    assert pred["gather_ms"] == pytest.approx(0.030)  # the token broadcast, no logits
    assert plan.notes["parallel"]["merge_ms"] == pytest.approx(pred["merge_ms"], abs=1e-6)
    # the plan's own predictions are the walk with the merges
    from kvc.planner.evaluate import evaluate

    bare = dataclasses.replace(plan, split="rows", world_size=1)
    ctx = np.array([plan.prompt_len])
    rank_hw = per_rank(r.hardware, 2)
    with_m = evaluate(r.spec, rank_hw, plan, ctx, 1, "float16")[0][0]
    without = evaluate(r.spec, rank_hw, bare, ctx, 1, "float16")[0][0]
    assert with_m == pytest.approx(plan.predicted_step_ms[0]) and with_m > without


def test_the_lp_is_the_walk_with_the_merges():
    from kvc.planner import cost, lanes, lp

    spec = PRESETS["opt-6.7b"]
    hw = dataclasses.replace(load_config(OPT).hardware, collective_us=400.0)
    c = cost.layer_costs(spec, hw, 4, "float16", shares=4)
    assert c.merge > 0.4 and cost.layer_costs(spec, hw, 4, "float16").merge == 0.0
    x, z, w, T, st = lp.solve(c, 4, 512, look=1, chunks=2, resident=(False, True, False, False),
                              deadline=1e18, with_step=True, with_values=True)
    assert st.merge == [c.merge, 0.0, c.merge, c.merge]  # a resident unit is not split
    A, K, R, C, D = (np.asarray(v, dtype=float) for v in (st.A, st.K, st.R, st.C, st.D))
    kw = dict(back=st.back, front=st.front, offloaded=st.offloaded, merge=st.merge)
    step = cost.simulate(*(v[:, None] for v in (A, K, R, C, D)), st.head, 1, 2, **kw)[0][0]
    assert step == pytest.approx(T, rel=1e-6)
    items = cost.intervals(A, K, R, C, D, st.head, 1, 2, **kw)
    assert max(it["end"] for it in items) == pytest.approx(T, rel=1e-6)
    assert sum(it["kind"] == "merge" for it in items) == 3
    # the slot is free once attention has read it, before the merge: lookahead 1 with a
    # long merge lets the next unit's copies start before this unit ends
    m = lanes.Step(A=[0, 0], K=[1.0, 10.0], R=[0, 0], C=[1.0, 1.0], D=[0, 0], W=[0, 0], head=0.0,
                   offloaded=[True, True], streams=[False, False], lookahead=0, act_chunks=1,
                   merge=[5.0, 5.0])
    # unit 0: copy 0..1, attention 1..2, merge 2..7; unit 1's copy (one slot) waits for 2, not
    # 7: 2..12, attention 12..13, merge 13..18
    assert lanes.walk(lanes.IntervalOps(), m) == pytest.approx(18.0)


def test_a_token_plans_json_round_trip(long_plans):
    plan = long_plans[2][1]
    d = plan.to_json()
    assert d["split"] == "tokens" and d["world_size"] == 2
    assert Plan.from_json(json.loads(json.dumps(d))) == plan
    assert "split" not in long_plans[1][1].to_json()
    assert Plan.from_json({k: v for k, v in d.items() if k != "split"}).split == "rows"


def test_the_replica_must_fit_a_ranks_share_of_the_host(long_plans):
    r, _ = long_plans[4]
    small = resolve(load_config(LONG, ["parallel.world_size=4", "parallel.split=tokens",
                                       "hardware.cpu_mem_gb=80"]))
    with pytest.raises(KvcError) as e:  # 25.8 GB per rank > 80 / 4
        make_plan(small.spec, small.hardware, small.request)
    assert "full replica" in str(e.value) and "\n" not in str(e.value)
    # max_context null: the longest whole context whose replica fits a rank's 20 GB
    auto = resolve(load_config(LONG, ["parallel.world_size=4", "parallel.split=tokens",
                                      "hardware.cpu_mem_gb=80", "workload.max_context=null",
                                      "workload.prompt_len=1024"]))
    plan = make_plan(auto.spec, auto.hardware, auto.request)
    full = plan.notes["parallel"]["max_context"]
    assert 1056 < full < 65568 and plan.max_context == -(-full // 4) + 1
    from kvc.planner.memory import host_memory_gb

    assert host_memory_gb(auto.spec, plan, 1, "float16") <= 20.0


def test_window_layers_are_cut_into_shares_too():
    from kvc.planner.sizes import layer_contexts

    r = resolve(load_config({"model": {"preset": "tiny-gemma2", "dtype": "float32"},
                             "hardware": "cpu", "workload": {"batch_size": 1, "prompt_len": 40,
                                                             "gen_len": 4, "max_context": 48}},
                            ["parallel.world_size=2", "parallel.split=tokens",
                             "schedule.chunk_tokens=1", "schedule.recompute_fraction=null"]))
    spec = r.spec  # sliding window 8 on layers 0 and 2: 7 cached tokens, 4 per share
    assert layer_contexts(spec, np.array([3, 20]), 2).tolist() == [[3, 4], [3, 20], [3, 4], [3, 20]]
    assert layer_contexts(spec, np.array([3, 20])).tolist() == [[3, 7], [3, 20], [3, 7], [3, 20]]
    plan = make_plan(spec, r.hardware, r.request)
    for u in (0, 2):  # past its cap a window unit's l is the cap's, whichever share asks
        assert {plan.recompute_tokens(u, m) for m in range(4, plan.max_context + 1)} == \
            {plan.recompute_tokens(u, 4)}
    # (that plan recomputes nothing: the fix-up itself, on a table that does)
    from types import SimpleNamespace

    from kvc.planner.scheduler import _window_shares

    job = SimpleNamespace(spec=spec, ctx=np.arange(1, 13), shares=2, L=4,
                          steps=lambda plan, l: "walked again")
    l = np.tile(np.arange(1, 13), (4, 1)) // 2
    fixed, steps = _window_shares(job, None, l.copy(), "as it was")
    assert steps == "walked again"
    assert fixed[0].tolist() == fixed[2].tolist() == [0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]
    assert (fixed[[1, 3]] == l[[1, 3]]).all()
    assert _window_shares(job, None, fixed.copy(), "as it was")[1] == "as it was"


def test_search_policy_may_split_one_row_by_tokens():
    r = resolve(load_config(TINY, ["parallel.world_size=4", "parallel.split=tokens"]))
    tried = []
    plan, tps = search_policy(r.spec, r.hardware, r.request, batch_sizes=[1, 2], tried=tried,
                              micro_batches=(1, 2))
    assert {(t["batch"], t["micro_batches"]) for t in tried} == {(1, 1), (2, 1), (2, 2)}
    assert plan.split == "tokens" and plan.batch_size in (1, 2)


def test_kvc_plan_says_the_token_split(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps(LONG))
    assert main(["plan", str(path), "parallel.world_size=2", "parallel.split=tokens", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["split"], d["world_size"], d["rank_batch"], d["batch_size"]) == ("tokens", 2, 1, 1)
    assert (d["prompt_len"], d["gen_len"], d["max_context"], d["context"]) == (65536, 32, 65568, 65536)
    assert d["share_context"] == 32768 and d["share_max_context"] == 32785
    assert d["plan"]["split"] == "tokens" and d["plan"]["max_context"] == 32785
    par = d["parallel"]
    assert par["split"] == "tokens" and par["merge_ms"] > 0 and par["merges_ms"] == pytest.approx(32 * par["merge_ms"])
    assert d["cpu_pool_gb"] > par["cpu_mem_gb"] / 4 and d["modes"]["gpu_resident"]["predicted_step_ms"] is None
    assert all(row["kv_tokens"] + row["recompute_tokens"] == 32768 for row in d["layers"])
    r = resolve(load_config(TINY, ["parallel.world_size=3", "parallel.split=tokens"]))
    from kvc.reports.plan import plan_text

    text = plan_text(r.spec, r.hardware, r.request)
    assert "batch 8 over 3 GPUs, a token split" in text
    assert "attends to ~1/3 of each offloaded layer's context" in text
    assert "full replica" in text and "all-gather of the ranks' partial" in text
    # rows say what they said
    rows = plan_text(r.spec, r.hardware, r.request.but(split="rows"))
    assert "token split" not in rows and "3 rows per rank" in rows


def test_a_token_artifact_is_read_and_inspected(tmp_path):
    from kvc.api import compile_artifact
    from kvc.artifact import read_manifest
    from kvc.reports.inspect import inspect_text

    cfg = {**TINY, "workload": {"batch_size": 1, "prompt_len": 16, "gen_len": 4, "max_context": 20}}
    art = compile_artifact(cfg, ["parallel.world_size=3", "parallel.split=tokens"],
                           output=tmp_path / "a.kvc")
    m = read_manifest(art)
    assert (m["plan"]["split"], m["plan"]["prompt_len"], m["plan"]["gen_len"],
            m["plan"]["max_context"]) == ("tokens", 6, 1, 8)
    text = inspect_text(art)
    assert "a token split" in text and "full replica" in text and "contexts 1..20" in text
    path = art / "manifest.json"
    d = json.loads(path.read_text())
    for bad, needle in (("cols", "plan.split"), ("rows", "plan.split differs")):
        path.write_text(json.dumps({**d, "plan": {**d["plan"], "split": bad}}))
        with pytest.raises(KvcError, match=needle):
            read_manifest(art)
    path.write_text(json.dumps({**d, "plan": {**d["plan"], "prompt_len": 16}}))
    with pytest.raises(KvcError, match="prompt_len"):
        read_manifest(art)
