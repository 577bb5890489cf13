"""Cost model: bytes/FLOPs from shapes, and the step simulation each mode's timing rests on."""
import numpy as np
import pytest

from kvc.ir.graph import HOST_KINDS, host_kinds
from kvc.planner import cost
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.models import costs, param_count
from kvc.models import PRESETS

HW = HardwareConfig(name="t", h2d_gbps=32, d2h_gbps=32, bidir_gbps=32, gemm_tflops=312,
                    gemm_half_rows=0, attn_gbps=2000, gpu_mem_gb=80, link_latency_us=0,
                    launch_us=0, attn_fixed_us=0)


def test_activations_are_half_the_kv_bytes_for_mha_and_more_for_gqa():
    mha, gqa = PRESETS["opt-6.7b"], PRESETS["llama-3-8b"]
    assert cost.act_bytes(mha, 4, 100, 2) * 2 == cost.kv_bytes(mha, 4, 100, 2)
    assert cost.act_bytes(gqa, 4, 100, 2) == 2 * cost.kv_bytes(gqa, 4, 100, 2)  # h_kv = h/4


def test_recompute_flops_match_design_formula():
    s = PRESETS["llama-2-7b"]
    b, l, h = 3, 50, s.hidden_size
    assert cost.recompute_flops(s, b, l) == 2 * b * l * h * 2 * s.kv_width


def test_unknown_dtype_is_a_kvc_error():
    with pytest.raises(KvcError, match="dtype"):
        cost.dtype_bytes("int3")


def test_layer_costs_slopes():
    s = PRESETS["opt-6.7b"]
    c = cost.layer_costs(s, HW, 2, "float16")
    assert c.kv_per_tok == pytest.approx(2 * c.act_per_tok)
    assert c.act_per_tok == pytest.approx(2 * 4096 * 2 / 32e9 * 1e3)
    gemm = 4 * 2 * 4096 * 4096 / 312e12 * 1e3
    passes = costs(s).elementwise_passes * 2 * 4096 * 2 / (HW.attn_gbps * 1e9) * 1e3
    assert c.rec_per_tok == pytest.approx(gemm + passes)


def test_attention_and_plain_streams_have_their_own_rates():
    """attn_gbps prices the attention kernel's K,V read; mem_gbps (0: attn_gbps's value, as in
    hardware files made before it) the weight reads and elementwise passes."""
    import dataclasses

    s = PRESETS["opt-6.7b"]
    assert HW.stream_gbps == HW.attn_gbps
    base = cost.layer_costs(s, HW, 8, "float16")
    fast_attn = cost.layer_costs(s, dataclasses.replace(HW, attn_gbps=4000, mem_gbps=2000), 8, "float16")
    assert fast_attn.attn_per_tok == pytest.approx(base.attn_per_tok / 2)
    assert (fast_attn.rec_per_tok, fast_attn.layer_fixed) == (base.rec_per_tok, base.layer_fixed)
    slow_mem = cost.layer_costs(s, dataclasses.replace(HW, mem_gbps=1000), 8, "float16")
    assert slow_mem.attn_per_tok == base.attn_per_tok and slow_mem.rec_per_tok > base.rec_per_tok


def test_host_time_weighs_each_familys_ops():
    hw = HardwareConfig(host_module_us=20, host_op_us=10, host_view_us=2, host_kvc_us=30, host_graph_us=25)
    kinds = np.array([1, 100, 50, 10, 3])
    for name in ("opt-6.7b", "llama-2-7b"):
        spec = PRESETS[name]
        want = 20 + 100 * 10 * costs(spec).host_op_weight + 50 * 2 + 10 * 30 + 3 * 25
        assert cost.host_ms(hw, kinds, spec) == pytest.approx(want * 1e-3)
    assert costs(PRESETS["llama-2-7b"]).host_op_weight > costs(PRESETS["opt-6.7b"]).host_op_weight > 1


def test_host_nodes_match_the_lowered_graphs():
    """The host lane's counts (kvc.compiler.host_counts: rows solved from a 1- and 2-layer
    model's probe plans) count a bigger decode graph's nodes: compare with what
    kvc.compiler.lowering makes."""
    import dataclasses

    from kvc.compiler.lowering import lower
    from kvc.models import build_model
    from kvc.ir.plan import forced_plan

    for name in ("tiny-opt", "tiny-llama", "tiny-llama-gqa"):
        spec = dataclasses.replace(PRESETS[name], num_layers=3)
        for mode, frac, chunks in (("gpu_resident", 0, 1), ("full_offload", 0, 1),
                                   ("kvpr", 0.5, 1), ("pipelined", 0.5, 3)):
            plan = forced_plan(mode, 3, 8, 8, 64, frac, act_chunks=chunks)
            gm = lower(build_model(spec, "meta", "float16"), plan).decode
            nodes = sum(n.op not in ("placeholder", "get_attr", "output") for n in gm.graph.nodes)
            rec = [frac > 0 and mode != "gpu_resident"] * 3
            assert cost.host_nodes(spec, plan.resident, rec, plan.act_chunks) == nodes, (name, mode)
            by_kind = host_kinds(gm)
            assert list(cost.host_node_kinds(spec, plan.resident, rec, plan.act_chunks)) == [by_kind[k] for k in HOST_KINDS], (name, mode)


def test_host_rows_are_read_once_per_model_structure():
    """The rows depend on the model's structure, not its layer count: one derivation serves
    every depth of a model, and a model of another shape (grouped-query heads) gets its own."""
    import dataclasses

    from kvc.compiler import host_counts

    spec = PRESETS["tiny-llama"]
    rows = host_counts.host_rows(spec)
    hits = host_counts._rows.cache_info().hits
    assert rows is host_counts.host_rows(dataclasses.replace(spec, num_layers=7))
    assert host_counts._rows.cache_info().hits == hits + 1
    assert rows.shape == (len(host_counts.ROWS), len(HOST_KINDS)) and (rows >= 0).all()
    misses = host_counts._rows.cache_info().misses
    host_counts.host_rows(PRESETS["tiny-llama-gqa"])
    assert host_counts._rows.cache_info().misses == misses + 1
    single = host_counts.host_rows(spec, micro_batches=False)  # no micro-batch probes lowered
    assert (single == rows[:len(single)]).all() and len(single) < len(rows)


def _sim(c, s, l, resident, look, chunks):
    L = len(l)
    A, K, R, C, D = cost.durations(c, np.full((L, 1), s), np.array(l)[:, None],
                                   np.array(resident)[:, None], chunks)
    return cost.simulate(A, K, R, C, D, c.head, look, chunks), (A, K, R, C, D)


def test_kvpr_layer_time_is_act_plus_max():
    c = cost.layer_costs(PRESETS["opt-6.7b"], HW, 8, "float16")
    (step, _, _), (A, K, R, C, D) = _sim(c, 1024, [512] * 4, [False] * 4, 0, 1)
    expect = (A + np.maximum(R, K) + C).sum() + c.head
    assert step[0] == pytest.approx(max(expect, step[0] - D[-1][0]))


def test_kvpr_next_copies_start_when_attention_has_read_the_slot():
    """One staging slot (kvpr): layer i+1's copies wait for layer i's attention, not for its
    output projection and MLP (`layer_back`), which run beside them (passes/streams.py records
    slot_free after attention). The LP states the same (test_weights: LP == simulate)."""
    c = cost.layer_costs(PRESETS["opt-6.7b"], HW, 8, "float16")
    assert 0 < c.layer_back < c.layer_fixed
    L = 6
    A, K, R, C, D = cost.durations(c, np.full((L, 1), 1024), np.full((L, 1), 512),
                                   np.zeros((L, 1), bool), 1)
    assert A[0, 0] >= c.layer_back  # the copy, not the previous layer, is then on the path
    step = cost.simulate(A, K, R, C, 0 * D, c.head, 0, 1, back=c.layer_back)[0][0]
    per = A[0, 0] + max(R[0, 0], K[0, 0]) + C[0, 0]
    assert step == pytest.approx(L * per - (L - 1) * c.layer_back + c.head)
    whole = cost.simulate(A, K, R, C, 0 * D, c.head, 0, 1)[0][0]  # without: the whole layer
    assert whole == pytest.approx(L * per + c.head)


def test_a_layers_front_runs_while_its_copies_land():
    """The new token's norm and projections read nothing staged and come first in the layer:
    with one staging slot (kvpr) they run while the layer's copies land, so only attention
    and what follows wait for the K,V tail. The next layer's copies still wait for attention
    (the slot), so every layer saves its front. A resident step (no copies) takes exactly as
    long either way."""
    c = cost.layer_costs(PRESETS["opt-6.7b"], HW, 8, "float16")
    assert 0 < c.layer_front and c.layer_front + c.layer_back <= c.layer_fixed + 1e-12
    L = 6
    args = [np.full((L, 1), 1024), np.full((L, 1), 512)]
    A, K, R, C, D = cost.durations(c, *args, np.zeros((L, 1), bool), 1)
    assert A[0, 0] + K[0, 0] > R[0, 0] + c.layer_front  # the copies are on the path
    base = cost.simulate(A, K, R, C, 0 * D, c.head, 0, 1, back=c.layer_back)[0][0]
    fronted = cost.simulate(A, K, R, C, 0 * D, c.head, 0, 1, back=c.layer_back, front=c.layer_front)[0][0]
    assert fronted == pytest.approx(base - L * c.layer_front)
    A, K, R, C, D = cost.durations(c, *args, np.ones((L, 1), bool), 1)
    resident = [cost.simulate(A, K, R, C, D, c.head, 1, 1, back=c.layer_back, front=f)[0][0]
                for f in (0.0, c.layer_front)]
    assert resident[0] == pytest.approx(resident[1])


def test_full_offload_steady_state_is_max_of_copy_and_compute():
    c = cost.layer_costs(PRESETS["opt-6.7b"], HW, 8, "float16")
    L = 40
    (step, link, gpu), (A, K, R, C, D) = _sim(c, 2048, [0] * L, [False] * L, 1, 1)
    per = max(K[0, 0], C[0, 0])
    # first copy exposed, then one max() per layer
    assert step[0] == pytest.approx(K[0, 0] + (L - 1) * per + C[0, 0] + c.head, rel=1e-3)


def test_pipelined_without_recompute_equals_full_offload():
    c = cost.layer_costs(PRESETS["opt-6.7b"], HW, 8, "float16")
    a = _sim(c, 1000, [0] * 6, [False] * 6, 1, 4)[0][0]
    b = _sim(c, 1000, [0] * 6, [False] * 6, 1, 1)[0][0]
    assert a[0] == pytest.approx(b[0])


def test_resident_layers_never_slow_a_step():
    c = cost.layer_costs(PRESETS["opt-6.7b"], HW, 8, "float16")
    base = _sim(c, 3000, [1024] * 8, [False] * 8, 1, 4)[0][0][0]
    for i in range(8):
        res = [j == i for j in range(8)]
        assert _sim(c, 3000, [1024] * 8, res, 1, 4)[0][0][0] <= base + 1e-9


def test_chunks_overlap_the_activation_copy_with_recompute():
    c = cost.layer_costs(PRESETS["opt-6.7b"], HW, 32, "float16")
    # one layer, all recomputed: the recompute of chunk k hides under the copy of chunk k+1
    (one, _, _), (A, K, R, C, D) = _sim(c, 2048, [2048], [False], 1, 1)
    four = _sim(c, 2048, [2048], [False], 1, 4)[0][0]
    assert one[0] == pytest.approx(A[0, 0] + R[0, 0] + C[0, 0] + c.head)
    assert four[0] < one[0] - 0.5 * min(A[0, 0], R[0, 0])


def test_memory_terms_budget():
    s = PRESETS["opt-6.7b"]
    m = cost.memory_terms(s, HW, 1, 2047, "float16", buffers=2, with_act=False)
    assert m["weights_gb"] == pytest.approx(param_count(s) * 2 / 1e9)
    assert m["layer_kv_gb"] == pytest.approx(2 * 2048 * 4096 * 2 / 1e9)
    assert m["staging_gb"] == pytest.approx(2 * m["layer_kv_gb"])
    assert m["free_gb"] == pytest.approx(80 - m["weights_gb"] - m["staging_gb"]
                                         - m["workspace_gb"] - m["margin_gb"])
