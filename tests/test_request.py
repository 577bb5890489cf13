"""One PlanRequest per config: `kvc plan` shows the plan `kvc compile` builds, under every
schedule and workload override (the CLI once dropped schedule.resident_cache and
schedule.solver_time_limit_s from `kvc plan`)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from kvc.api import compile_artifact, make_plan, resolve
from kvc.cli import main
from kvc.config import ScheduleConfig, load_config
from kvc.errors import KvcError
from kvc.ir.request import PlanRequest

MODEL = {"model": {"preset": "tiny-opt", "dtype": "float32"}, "hardware": "cpu",
         "workload": {"batch_size": 2, "prompt_len": 96, "gen_len": 8, "max_context": 104}}
# one override per schedule field (and the workload's micro-batches); the test below fails
# when a ScheduleConfig field is added without a case here
OVERRIDES = {
    "mode": ["schedule.mode=kvpr", "schedule.mode=full_offload", "schedule.mode=gpu_resident"],
    "recompute_fraction": ["schedule.recompute_fraction=0.5"],
    "weight_stream_fraction": ["schedule.weight_stream_fraction=0.5"],
    "resident_cache": ["schedule.resident_cache=false"],
    "chunk_tokens": ["schedule.chunk_tokens=32"],
    "act_chunks": ["schedule.act_chunks=2"],
    "solver_time_limit_s": ["schedule.solver_time_limit_s=3"],
    "cuda_graphs": ["schedule.cuda_graphs=false"],
    "cpu_attention": ["schedule.cpu_attention=off"],
    "cpu_attention_fraction": ["schedule.cpu_attention_fraction=0.25"],
}
# a GPU budget that holds the tiny model's caches next to its weights and staging
BUDGET = ["hardware.mem_margin_gb=0", "hardware.gpu_mem_gb=0.0016"]
CASES = [[], ["workload.num_gpu_batches=2"], ["workload.max_context=null"],
         ["workload.max_context=150"]] + [[o] for v in OVERRIDES.values() for o in v]


def _comparable(plan: dict) -> dict:
    notes = {k: v for k, v in plan.get("notes", {}).items() if k != "solve_s"}  # a timing
    return {**plan, "notes": notes}


def test_every_schedule_field_has_a_case():
    assert set(OVERRIDES) == {f.name for f in dataclasses.fields(ScheduleConfig)}


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: ",".join(o) or "defaults")
def test_plan_and_compile_agree(overrides, tmp_path, capsys, monkeypatch):
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps(MODEL))  # JSON is YAML
    monkeypatch.chdir(tmp_path)
    # a budget that holds some layers' caches, so resident_cache matters
    extra = BUDGET
    out = compile_artifact(str(path), overrides + extra, output=tmp_path / "a.kvc")
    stored = json.loads((out / "manifest.json").read_text())["plan"]
    assert main(["plan", str(path), *overrides, *extra, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["plan"]
    assert _comparable(shown) == _comparable(stored)


def test_resident_cache_override_changes_the_plan():
    """The case above is not vacuous: the budget lets the planner keep layers on the GPU."""
    keep = make_plan(resolve(load_config(MODEL, BUDGET)))
    drop = make_plan(resolve(load_config(MODEL, BUDGET + ["schedule.resident_cache=false"])))
    assert any(keep.resident) and not any(drop.resident)


def test_a_request_refuses_what_no_plan_can_serve():
    base = PlanRequest(batch_size=4, prompt_len=8, gen_len=2, dtype="float16")
    with pytest.raises(KvcError, match="schedule.mode"):
        base.but(mode="fastest")
    with pytest.raises(KvcError, match="num_gpu_batches"):
        base.but(micro_batches=3)
    with pytest.raises(KvcError, match="recompute_fraction"):
        base.but(recompute_fraction=1.5)
    with pytest.raises(KvcError, match=r"workload.max_context = 9: expected null or an integer >= "
                                       r"workload.prompt_len \+ workload.gen_len = 10"):
        base.but(max_context=9)
    with pytest.raises(KvcError, match="workload.max_context"):
        base.but(max_context=True)
    with pytest.raises(KvcError, match=r"schedule.cpu_attention = 'on'; expected one of \['auto', 'off'\]"):
        base.but(cpu_attention="on")
    with pytest.raises(KvcError, match=r"schedule.cpu_attention_fraction = 1.5: expected null or 0..1"):
        base.but(cpu_attention_fraction=1.5)
    with pytest.raises(KvcError, match="keeps the cache on the GPU"):
        base.but(mode="gpu_resident", cpu_attention_fraction=0.5)


def test_a_request_carries_max_context_from_the_config():
    from kvc.config import load_config as load

    assert PlanRequest.from_config(load(MODEL)).max_context == 104
    cfg = load({**MODEL, "workload": {**MODEL["workload"], "max_context": None}})
    req = PlanRequest.from_config(cfg)
    assert req.max_context is None and req.workload_end == 104
    assert list(req.workload_contexts) == list(range(96, 105))
    plan = make_plan(resolve(cfg))  # null: the model's positions as far as memory holds them
    assert 104 <= plan.max_context <= 2048 and plan.context_range == (1, plan.max_context)
    assert "max_context" in plan.notes
