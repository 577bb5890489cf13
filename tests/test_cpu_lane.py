"""The CPU attention lane's runtime (issue 17): partial attention over pool rows in place and
the exact split-softmax merge, and every offloading schedule with the lane forced on against
the reference decoder (fp32, CPU): the same tokens, logits within 1e-5."""
from __future__ import annotations

import math
from dataclasses import replace
from functools import cache

import pytest
import torch

from kvc.compiler.lowering import lower
from kvc.ir.plan import forced_plan
from kvc.models import build_model, preset
from kvc.models.attend import merge
from kvc.runtime.cpu_attention import CpuLane, partial_attention
from kvc.runtime.reference import ReferenceDecoder
from kvc_fixtures import perturb_small_params

pytestmark = pytest.mark.usefixtures("one_thread")


def _full(q, k, v, scale, softcap=0.0, real=None):
    """Attention of q [b, H, hd] over k, v [n, b, n_kv, hd], the plain way."""
    b, h, d = q.shape
    g = h // k.shape[2]
    kk = k.permute(1, 2, 0, 3).repeat_interleave(g, 1)  # [b, H, n, hd]
    vv = v.permute(1, 2, 0, 3).repeat_interleave(g, 1)
    s = torch.einsum("bhd,bhnd->bhn", q, kk) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if real is not None:
        s = s.masked_fill(~real[:, None, :], -math.inf)
    return torch.einsum("bhn,bhnd->bhd", s.softmax(-1), vv)


@pytest.mark.parametrize("heads,kv_heads,softcap", [(4, 4, 0.0), (8, 2, 0.0), (4, 2, 5.0)])
def test_split_attention_merges_to_the_whole(heads, kv_heads, softcap):
    gen = torch.Generator().manual_seed(0)
    b, n, d, c = 3, 23, 16, 9
    q = torch.randn(b, heads, d, generator=gen)
    k, v = (torch.randn(n, b, kv_heads, d, generator=gen) for _ in range(2))
    real = torch.ones(b, n, dtype=torch.bool)
    real[1, :12] = False  # a padded row: its first 12 keys are padding, all of the CPU's 9
    scale = d ** -0.5
    want = _full(q, k, v, scale, softcap, real)
    out_c, lse_c = partial_attention(q, _hm(k[:c]), _hm(v[:c]), scale, softcap, real[:, :c])
    out_g, lse_g = partial_attention(q, _hm(k[c:]), _hm(v[c:]), scale, softcap, real[:, c:])
    assert torch.isinf(lse_c[1]).all() and (out_c[1] == 0).all()
    torch.testing.assert_close(merge(out_g, lse_g, out_c, lse_c), want, atol=1e-6, rtol=1e-5)


def _hm(x):
    """A token-major [n, b, n_kv, hd] block as the head-major view partial_attention takes."""
    return x.permute(1, 2, 0, 3)


def test_the_lane_copies_pool_rows_head_major_once_and_starts_over():
    """The lane attends over its own head-major copy of the pool's rows: filled at the
    prefill (prepare), grown as its share grows, started over at the next call's prefill."""
    lane = CpuLane(torch.device("cpu"), 1)
    k_pool, v_pool = torch.randn(20, 2, 2, 8), torch.randn(20, 2, 2, 8)
    q = torch.randn(2, 4, 8)
    lane.prepare(0, k_pool, v_pool, 6)
    assert lane.filled[0] == 6
    for lo, c in ((0, 6), (0, 9), (3, 10)):
        lane.begin(0, q, k_pool, v_pool, lo, c, 0.3, 0.0, None)
        out, lse = lane.end(0)
        want, want_lse = partial_attention(q, _hm(k_pool[lo:lo + c]), _hm(v_pool[lo:lo + c]), 0.3)
        torch.testing.assert_close(out, want, atol=0, rtol=0)
        torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)
        torch.testing.assert_close(out, _full(q, k_pool[lo:lo + c], v_pool[lo:lo + c], 0.3), atol=1e-6, rtol=1e-5)
    assert lane.filled[0] == 13
    k_pool.normal_()  # the next call's prefill writes the pools anew
    v_pool.normal_()
    lane.restart()
    lane.begin(0, q, k_pool, v_pool, 0, 5, 0.3, 0.0, None)
    out, _ = lane.end(0)
    torch.testing.assert_close(out, _full(q, k_pool[:5], v_pool[:5], 0.3), atol=1e-6, rtol=1e-5)
    lane.close()


VARIANTS = {
    "tiny-opt": preset("tiny-opt"),
    "tiny-llama-gqa": preset("tiny-llama-gqa"),
    "tiny-mistral-w5": replace(preset("tiny-llama-gqa"), model_type="mistral", sliding_window=5),
    "tiny-gemma2": replace(preset("tiny-gemma2"), sliding_window=5),
}
PROMPT, GEN = 9, 10


@cache
def model(name):
    spec = VARIANTS[name]
    return spec, perturb_small_params(build_model(spec, "cpu", torch.float32, seed=0))


@cache
def reference(name, batch=3, padded=False):
    spec, m = model(name)
    ids = torch.randint(1, spec.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :6] = 0
        mask[2, :2] = 0
    return ids, mask, *ReferenceDecoder(m, spec).generate(ids, GEN, return_logits=True, attention_mask=mask)


def _check(name, mode, fraction, cpu_fraction, micro_batches=1, padded=False):
    from kvc.api import assemble

    spec, m = model(name)
    plan = forced_plan(mode, spec.num_layers, PROMPT, GEN, 64, fraction, act_chunks=2,
                       micro_batches=micro_batches, cpu_fraction=cpu_fraction)
    assert plan.cpu_lane
    cm = assemble(lower(m, plan), plan, spec, torch.float32, torch.device("cpu"))
    ids, mask, ref_tokens, ref_logits = reference(name, 4 if micro_batches > 1 else 3, padded)
    try:
        tokens, logits = cm.generate(ids, GEN, return_logits=True, attention_mask=mask)
        cache_ = cm._cache
        used = sum(c for _, c in cache_.cpu_rows.values())
    finally:
        cm.close()
    where = f"{name} {mode} l={fraction} c={cpu_fraction} m={micro_batches} padded={padded}"
    assert used > 0, f"the lane attended to nothing: {where}"
    assert torch.equal(tokens, ref_tokens), where
    err = (logits - ref_logits).abs().max().item()
    assert err <= 1e-5, f"logits off by {err:.2e}: {where}"


@pytest.mark.parametrize("mode", ["pipelined", "kvpr", "full_offload"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_offloading_schedule_with_the_lane(name, mode):
    for fraction, cpu_fraction in ((0.0, 0.5), (0.4, 0.3), (0.0, 1.0), (0.5, 0.6)):
        if fraction and mode == "full_offload":
            continue
        _check(name, mode, fraction, cpu_fraction)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama-gqa", "tiny-gemma2"])
def test_the_lane_with_padding_and_micro_batches(name):
    _check(name, "pipelined", 0.3, 0.4, padded=True)
    _check(name, "pipelined", 0.3, 0.4, micro_batches=2)
    _check(name, "full_offload", 0.0, 0.5, micro_batches=2, padded=True)


def test_no_lane_without_cpu_tokens():
    plan = forced_plan("pipelined", 2, 8, 8, 64, 0.5)
    assert not plan.cpu_lane and not forced_plan("pipelined", 2, 8, 8, 64, 0.5, cpu_fraction=0.0).cpu_lane
    assert not forced_plan("gpu_resident", 2, 8, 8, 64, 0.0, cpu_fraction=0.5).cpu_lane


# --- the handoff pass: the query goes to the CPU before the layer's copies are issued --------

def _lowered_order(spec, plan, skip_handoff=False):
    from kvc.compiler.trace import trace_step
    from kvc.passes.pipeline import build_passes
    gm = trace_step(build_model(spec, "cpu", torch.float32, seed=0), prefill=False)
    for p in build_passes(plan):
        if skip_handoff and p.name == "handoff":
            break  # as the passes before it left it (flatten keeps names and order)
        p(gm)
    return gm


def _fences(gm, begin_name, plan):
    """The compute-stream fences (kvc.passes.handoff) before a cpu_attn_begin node."""
    from kvc.passes.handoff import Handoff
    h = Handoff(plan)
    names = [n.name for n in gm.graph.nodes]
    return {n.name for n in gm.graph.nodes if names.index(n.name) < names.index(begin_name) and h._fence(n)}


@pytest.mark.parametrize("streamed", [False, True], ids=["weights resident", "weights streamed"])
def test_handoff_issues_the_query_before_the_layers_copies(streamed):
    from kvc.ir.graph import op_arg
    spec = replace(preset("tiny-llama-gqa"), num_layers=4)
    plan = forced_plan("pipelined", 4, 16, 8, 64, 0.3, act_chunks=2, cpu_fraction=0.3)
    if streamed:
        plan = replace(plan, weights_streamed=(False, True, False, True))
    moved, traced = _lowered_order(spec, plan), _lowered_order(spec, plan, skip_handoff=True)
    names = [n.name for n in moved.graph.nodes]
    at = names.index
    for i in range(1, 4):
        begin = f"cpu_attn_begin_{i}"
        # ahead of this layer's write-back and of the copies issued for the layer after it
        assert at(begin) < at(f"offload_kv_{i}") and at(begin) < at(f"offload_act_{i}")
        if i + 1 < 4 and not (plan.weights_streamed and plan.weights_streamed[i]):  # (a streamed layer's waits for its weights)
            assert at(begin) < at(f"prefetch_kv_{i + 1}")
        # after everything its query reads, and below the same fences as traced
        node = next(n for n in moved.graph.nodes if n.name == begin)
        assert all(at(x.name) < at(begin) for x in node.all_input_nodes)
        assert _fences(moved, begin, plan) == _fences(traced, begin, plan)
        assert op_arg(node, "layer") == i
    if streamed:  # the hand-off of a streamed layer waits with its Q projection for the weights
        assert at("wait_weights_ready_3") < at("cpu_attn_begin_3")
    # the copies, events and cache verbs keep their traced order among themselves
    kinds = ("prefetch", "offload", "record", "wait", "staged", "put")
    ops = lambda gm: [n.name for n in gm.graph.nodes if n.name.startswith(kinds)]  # noqa: E731
    assert ops(moved) == ops(traced)


def test_a_lane_without_a_gpu_has_no_flag_poll():
    """The flag poll (kvc.runtime.flagwait) is a GPU kernel: on a CPU device the lane runs
    inline, with no flags (the GPU side is tests/test_gpu.py's)."""
    from kvc.runtime import flagwait

    assert not flagwait.available() or torch.cuda.is_available()
    lane = CpuLane(torch.device("cpu"), 2)
    assert lane.flags is None
    lane.close()
