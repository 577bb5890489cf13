"""Host memory (issue 6): pools page-locked to their exact size, and K,V pools that keep only the
rows the plan reads back as K,V.

CPU only. The CUDA calls of kvc.runtime.pinned are replaced by a recorder here, so everything
but the real cudaHostRegister runs; tests/test_gpu.py pins for real.
"""
from __future__ import annotations

import dataclasses
import gc
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from kvc_fixtures import hw, perturb_small_params

from kvc.planner import cost
from kvc.errors import KvcError
from kvc.compiler.lowering import lower
from kvc.models import build_model, preset
from kvc.runtime.reference import ReferenceDecoder
from kvc.models import PRESETS
from kvc.ir.plan import Plan, forced_plan
from kvc.ir.request import PlanRequest
from kvc.runtime import pinned
from kvc.api import assemble
from kvc.runtime.offloaded import OffloadedCache
from kvc.planner.scheduler import make_plan

CONF = Path(__file__).resolve().parents[1] / "conf" / "hardware"
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def table_plan(prompt=16, gen=8, chunks=2) -> Plan:
    """A solved-style plan (a recompute table, no forced fraction) for 3 layers whose l moves up
    and down between layers and contexts: layer 0 resident, the lowest l 5 (layer 2, s = 18)."""
    rows = []
    for j in range(gen + 1):
        s = prompt + j
        rows.append((0, min(s, 8 + (j % 3) * 4), 5 if j == 2 else min(s, 12 + j)))
    return Plan(mode="pipelined", num_layers=3, prompt_len=prompt, gen_len=gen, chunk_tokens=64,
                resident=(True, False, False), recompute=tuple(rows), act_chunks=chunks)


def lp_plan(spec) -> Plan:
    """A plan the LP solves: over a very slow link the offloaded layers recompute everything
    (no layer kept on the GPU, where the budget would hold them all)."""
    h = hw("cpu", h2d_gbps=0.001, host_module_us=0.0, host_op_us=0.0, host_view_us=0.0,
           host_kvc_us=0.0)
    plan = make_plan(spec, h, PlanRequest(batch_size=2, prompt_len=16, gen_len=8, dtype="float32",
                     mode="pipelined", chunk_tokens=4, resident_cache=False))
    assert plan.forced_fraction is None and plan.offloaded
    return plan


def brute_min_kv_row(plan: Plan, lo: int, hi: int) -> int:
    off = [i for i in range(plan.num_layers) if not plan.resident[i]]
    ls = [plan.recompute_tokens(i, s) for s in range(lo, hi) for i in off]
    return min(ls, default=hi)


def cache(plan: Plan, name="tiny-opt", batch=2, max_tokens=24, min_context=None) -> OffloadedCache:
    spec = preset(name)
    return OffloadedCache(plan, num_layers=plan.num_layers, batch=batch, max_tokens=max_tokens,
                          act_width=spec.hidden_size, num_kv_heads=spec.num_kv_heads,
                          head_dim=spec.head_dim, dtype=torch.float32, device=torch.device("cpu"),
                          num_events=0, min_context=min_context)


# --- Plan.min_kv_row --------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.0, 0.1, 1 / 3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("prompt", [1, 5, 16, 100])
def test_min_kv_row_of_a_forced_plan(fraction, prompt):
    plan = forced_plan("pipelined", 2, prompt, 40, 64, fraction)
    for lo in (1, prompt, prompt + 7):
        assert plan.min_kv_row(prompt + 40, lo) == brute_min_kv_row(plan, lo, prompt + 40)
    assert plan.min_kv_row(prompt + 40) == min(prompt, round(fraction * prompt))


def test_min_kv_row_of_a_table_plan():
    plan = table_plan()
    for lo in range(16, 25):
        for hi in range(lo, 26):
            assert plan.min_kv_row(hi, lo) == brute_min_kv_row(plan, lo, min(hi, 25)), (lo, hi)
    assert plan.min_kv_row(24) == 5
    assert plan.min_kv_row(24, 19) == 8  # past the dip at s = 18
    # nothing offloaded: no row is read; a table-less hand-made plan cannot be bounded
    assert forced_plan("gpu_resident", 2, 16, 8, 64, 0.5).min_kv_row(24) == 24
    assert replace(plan, recompute=()).min_kv_row(24) == 0


# --- pool rows ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction,kv_lo", [(0.0, 0), (0.5, 8), (0.77, 12), (1.0, 16)])
def test_kv_pools_keep_only_the_rows_read_back(fraction, kv_lo):
    c = cache(forced_plan("pipelined", 2, 16, 8, 64, fraction))
    assert c.kv_lo == kv_lo
    assert c.k_pool.shape[1] == c.v_pool.shape[1] == 24 - kv_lo
    assert c.k_stage.shape[1] == 24  # staging still holds every row attention reads
    c = cache(table_plan())
    assert c.kv_lo == 5 and c.k_pool.shape[:2] == (2, 19)


def test_host_pool_bytes_is_what_the_cache_allocates():
    spec = preset("tiny-opt")
    plans = [forced_plan("pipelined", 2, 16, 8, 64, f) for f in (0.0, 0.5, 1.0)]
    plans += [forced_plan("full_offload", 2, 16, 8, 64, 0.0), lp_plan(spec),
              replace(forced_plan("kvpr", 2, 16, 8, 64, 0.75, act_chunks=1), resident=(True, False))]
    plans += [table_plan(), lp_plan(replace(spec, num_layers=3))]
    for plan in plans:
        c = cache(plan)
        s_max = plan.prompt_len + plan.gen_len
        want = cost.host_pool_bytes(spec, 2, s_max, 4, sum(not r for r in plan.resident),
                                    min(s_max, plan.max_recompute_tokens(s_max)), plan.min_kv_row(s_max))
        assert c.host_bytes == want, plan
        assert c.host_bytes == sum(p.nbytes for p in (c.act_pool, c.k_pool, c.v_pool))


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_scheduler_refuses_exactly_what_the_runtime_allocates(fraction):
    """The planner's host check and the runtime's pools agree to the byte: a plan whose pools
    need N bytes passes with cpu_mem_gb just above N and is refused just below."""
    plan = forced_plan("pipelined", 2, 16, 8, 64, fraction)
    need = cache(plan).host_bytes / 1e9
    kw = {"batch_size": 2, "prompt_len": 16, "gen_len": 8, "dtype": "float32", "mode": "pipelined",
          "recompute_fraction": fraction}
    make_plan(preset("tiny-opt"), hw("cpu", cpu_mem_gb=need * (1 + 1e-9)), PlanRequest(**kw))
    with pytest.raises(KvcError, match="pinned CPU pools need"):
        make_plan(preset("tiny-opt"), hw("cpu", cpu_mem_gb=need * (1 - 1e-9)), PlanRequest(**kw))


def test_scheduler_counts_the_trimmed_kv_rows():
    """opt-6.7b, batch 32, 1024 + 8 tokens, all recomputed: full K,V pools would be 17 GB on top
    of 8.7 GB of activations; only 8 rows of K,V are ever read back."""
    spec, P, G, b = PRESETS["opt-6.7b"], 1024, 8, 32
    kw = {"batch_size": b, "prompt_len": P, "gen_len": G, "dtype": "float16", "mode": "pipelined"}
    h = hw("h100-pcie5", gpu_mem_gb=80.0, cpu_mem_gb=12.0)
    plan = make_plan(spec, h, PlanRequest(recompute_fraction=1.0, **kw))
    assert plan.min_kv_row(P + G) == P
    full = cost.host_pool_bytes(spec, b, P + G, 2, 32, P + G) / 1e9
    assert full > 25  # what the check counted before: refused at 12 GB
    with pytest.raises(KvcError, match=r"need 8\.\d GB, more than hardware.cpu_mem_gb = 8"):
        make_plan(spec, dataclasses.replace(h, cpu_mem_gb=8.0), PlanRequest(recompute_fraction=1.0, **kw))
    # a solved plan that keeps most layers' K,V on the CPU is still counted in full
    with pytest.raises(KvcError, match="pinned CPU pools"):
        make_plan(spec, dataclasses.replace(h, gpu_mem_gb=24.0), PlanRequest(recompute_fraction=0.0, **kw))


# --- the runtime reads the shifted rows -------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    """Three layers each, so that table_plan fits them."""
    out = {}
    for name in ("tiny-opt", "tiny-llama", "tiny-llama-gqa"):
        spec = replace(preset(name), num_layers=3)
        out[name] = spec, perturb_small_params(build_model(spec, "cpu", torch.float32, seed=0))
    return out


def _generate(models, name, plan, batch, prompt, gen, cm=None):
    spec, m = models[name]
    ids = torch.randint(0, spec.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(prompt))
    ref_tokens, ref_logits = ReferenceDecoder(m, spec).generate(ids, gen, return_logits=True)
    cm = cm or assemble(lower(m, plan), plan, spec, torch.float32, torch.device("cpu"))
    tokens, logits = cm.generate(ids, gen, return_logits=True)
    assert torch.equal(tokens, ref_tokens), (name, plan.forced_fraction, prompt)
    assert (logits - ref_logits).abs().max().item() <= ATOL
    return cm


CASES = [(name, kind) for name in ("tiny-opt", "tiny-llama-gqa")
         for kind in ("forced-1.0", "forced-0.6", "table")]
# the LP recomputes for multi-head models (grouped-query ones keep K,V: activations are bigger)
CASES += [("tiny-opt", "lp"), ("tiny-llama", "lp")]


@pytest.mark.parametrize("name,kind", CASES)
def test_parity_with_trimmed_kv_pools(models, name, kind):
    if kind == "table":
        plan = table_plan()
    elif kind == "lp":
        plan = lp_plan(models[name][0])
    else:
        plan = forced_plan("pipelined", 3, 16, 8, 64, float(kind[7:]), act_chunks=3)
    cm = _generate(models, name, plan, batch=2, prompt=16, gen=8)
    c = cm._cache
    assert c.kv_lo > 0 and c.k_pool.shape[1] == c.max_tokens - c.kv_lo < c.max_tokens
    cm.close()


def test_a_shorter_prompt_gets_a_new_cache(models):
    """A forced plan runs any prompt length; a cache made for 16-token prompts does not keep
    the rows a 5-token prompt reads, so the call makes a new one (and a longer prompt reuses it)."""
    plan = forced_plan("pipelined", 3, 16, 8, 64, 0.5, act_chunks=2)
    cm = _generate(models, "tiny-opt", plan, batch=2, prompt=16, gen=8)
    first = cm._cache
    assert first.kv_lo == 8
    _generate(models, "tiny-opt", plan, batch=2, prompt=5, gen=8, cm=cm)
    second = cm._cache
    assert second is not first and second.min_context == 5 and second.kv_lo == round(0.5 * 5)
    _generate(models, "tiny-opt", plan, batch=2, prompt=16, gen=8, cm=cm)
    assert cm._cache is second
    cm.close()


def test_reading_below_the_kept_rows_is_refused():
    c = cache(forced_plan("pipelined", 2, 16, 8, 64, 0.5), min_context=16)
    c.begin_step(16)  # l = 8 = kv_lo
    with pytest.raises(KvcError, match="reads K,V from token 5, but the CPU pools keep tokens 8.."):
        c.begin_step(10)


# --- pinned_empty ------------------------------------------------------------------------------

class FakeCuda:
    """Stands in for cudaHostRegister / cudaHostUnregister / synchronize, and records them."""

    def __init__(self, monkeypatch, register_rc=0, unregister_rc=0):
        self.calls = []
        self.register_rc, self.unregister_rc = register_rc, unregister_rc
        monkeypatch.setattr(pinned, "_register", self._register)
        monkeypatch.setattr(pinned, "_unregister", self._unregister)
        monkeypatch.setattr(pinned, "_synchronize", lambda d: self.calls.append(("sync", str(d))))

    def _register(self, ptr, n):
        self.calls.append(("register", ptr, n))
        return self.register_rc

    def _unregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return self.unregister_rc


def test_pinned_empty_registers_exactly_its_bytes(monkeypatch):
    fake = FakeCuda(monkeypatch)
    t = pinned.pinned_empty((3, 5, 7), torch.float16, torch.device("cuda:0"))
    ptr = t.data_ptr()
    assert t.device.type == "cpu" and t.shape == (3, 5, 7)
    assert fake.calls == [("register", ptr, 3 * 5 * 7 * 2)]  # 210 bytes, not 256
    view = t[1:]
    del t
    gc.collect()
    assert len(fake.calls) == 1  # a view still uses the memory: still registered
    view.fill_(1.0)
    del view
    gc.collect()
    # the device finishes its copies, then the block is unregistered, once
    assert fake.calls[1:] == [("sync", "cuda:0"), ("unregister", ptr)]


def test_pinned_empty_without_cuda_is_plain(monkeypatch):
    fake = FakeCuda(monkeypatch)
    t = pinned.pinned_empty((4, 2), torch.float32, torch.device("cpu"))
    e = pinned.pinned_empty((0, 2), torch.float32, torch.device("cuda"))
    del t, e
    gc.collect()
    assert fake.calls == []


def test_pinned_empty_failure_is_one_line(monkeypatch):
    FakeCuda(monkeypatch, register_rc=2)
    with pytest.raises(KvcError, match=r"pinning a 0\.00 GB host pool failed \(cudaHostRegister: CUDA error 2\)"):
        pinned.pinned_empty((1000,), torch.float32, torch.device("cuda"))


def test_unpin_failure_warns(monkeypatch):
    FakeCuda(monkeypatch, unregister_rc=1)
    held = [pinned.pinned_empty((1000,), torch.float32, torch.device("cuda"))]
    with pytest.warns(RuntimeWarning, match="cudaHostUnregister .* returned CUDA error 1"):
        held.clear()  # the last tensor over the memory goes: its finalizer runs


def test_host_check_counts_the_pools_and_the_streamed_weights(monkeypatch):
    seen = []
    monkeypatch.setattr("kvc.runtime.offloaded.check_host_memory", seen.append)

    class Weights:
        nbytes = 1000

    spec = preset("tiny-opt")
    plan = forced_plan("pipelined", 2, 16, 8, 64, 1.0)
    c = OffloadedCache(plan, num_layers=2, batch=2, max_tokens=24, act_width=spec.hidden_size,
                       num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=torch.float32,
                       device=torch.device("cpu"), num_events=0, weights=Weights())
    assert seen == [c.host_bytes + 1000]
