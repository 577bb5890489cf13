"""The pass pipeline as a whole: its order and meta, idempotence, refusal to run early, DCE
keeping every side-effect node, and `gm.code` as plain readable Python, the same on a retrace.
"""
# ruff: noqa: F405  (names come from pass_fixtures, shared by the three pass test files)
from __future__ import annotations

import pytest

from pass_fixtures import *  # noqa: F401,F403  (the toy decoder, plans and graph readers)

pytestmark = pytest.mark.usefixtures("one_thread")

def test_pipeline_order_and_meta():
    plan = plan_for()
    assert [p.name for p in build_passes(plan)] == list(ORDER)
    gm = compiled(ToyDecoder(), plan)
    assert gm.meta["kvc"]["passes"] == list(ORDER) and gm.meta["kvc"]["phase"] == "decode"


@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("mode", ["pipelined", "kvpr", "gpu_resident"])
def test_idempotent(prefill, mode):
    plan = plan_for(mode)
    gm = compiled(tiny("tiny-llama"), plan, prefill)
    code, names = gm.code, [n.name for n in gm.graph.nodes]
    assert run_pipeline(gm, plan).code == code
    for p in build_passes(plan):
        assert p(gm).modified is False
    assert gm.code == code and [n.name for n in gm.graph.nodes] == names
    assert gm.meta["kvc"]["passes"] == list(ORDER)


@pytest.mark.parametrize("k", range(2, len(ORDER)))
def test_pass_refuses_to_run_early(k):
    plan = plan_for()
    gm = trace_step(ToyDecoder(), prefill=False)
    passes = build_passes(plan)
    for p in passes[:k - 1]:  # everything before pass k but its direct predecessor
        p(gm)
    with pytest.raises(RuntimeError, match=rf"needs \[.*'{ORDER[k - 1]}'"):
        passes[k](gm)
    with pytest.raises(RuntimeError, match="needs"):  # a fresh graph: nothing ran yet
        build_passes(plan)[k](trace_step(ToyDecoder(), prefill=False))


def test_microbatch_refuses_to_run_after_annotate():
    """annotate needs no plan and annotates whatever graph it gets (layers or units); the
    microbatch pass makes the units, so it must come before annotate, and says so."""
    gm = annotated(ToyDecoder())
    with pytest.raises(RuntimeError, match="before 'annotate'"):
        build_passes(replace(plan_for(), micro_batches=2, resident=(False,) * 6))[0](gm)


def test_dead_code_elimination_keeps_side_effects():
    for model in (tiny("tiny-opt"), tiny("tiny-llama")):
        for prefill in (True, False):
            gm = compiled(model, plan_for(resident=(False, True, False)), prefill)
            before = [n.name for n in gm.graph.nodes]
            effects = [n.name for n in gm.graph.nodes if op_name(n) in EFFECT_OPS]
            assert effects and all(named(gm)[e].is_impure() for e in effects)
            gm.graph.eliminate_dead_code()
            assert [n.name for n in gm.graph.nodes] == before  # nothing dead, nothing lost


_OP_CALL = re.compile(r"torch\.ops\.kvc\.(\w+)\(([^)]*)\)")


@pytest.mark.parametrize("family", ["tiny-opt", "tiny-llama"])
def test_generated_code_is_readable(family):
    from kvc.compiler.lowering import lower
    plan = plan_for(chunks=2, layers=2)
    low = lower(tiny(family, layers=2), plan)
    code = low.code
    for bad in ("lambda", "<locals>", " at 0x", "<function", "<built-in"):
        assert bad not in code
    for gm in (low.prefill, low.decode):
        compile(gm.code, "graph.py", "exec")
    for op, args in _OP_CALL.findall(code):  # ids only: rt, node names and plain numbers
        for a in args.split(","):  # (cpu_attn_begin's scale and soft-cap are floats)
            assert re.fullmatch(r"\s*(rt|[a-z_0-9]+|\w+ = -?\d+|-?\d+\.\d+)\s*", a), (op, a)
    pre, dec = low.prefill.code, low.decode.code
    for i in range(2):
        for name in (f"offload_act_{i}", f"offload_kv_{i}", f"wait_act_data_{i}", f"wait_kv_data_{i}",
                     f"record_offloaded_{i}"):
            assert f"{name} = torch.ops.kvc." in pre and f"{name} = torch.ops.kvc." in dec
        for j in range(2):
            assert (f"prefetch_act_{i}_{j} = torch.ops.kvc.prefetch_act(rt, stream = 1, "
                    f"layer = {i}, chunk = {j})") in dec
            assert f"wait_act_ready_{i}_{j} = torch.ops.kvc.wait_event(rt, stream = 0," in dec
            assert f"staged_act_{i}_{j} = torch.ops.kvc.staged_act(rt, layer = {i}, chunk = {j})" in dec
            assert f"re{i}_{j}_layers_{i}_self_attn_k_proj = " in dec
            if family == "tiny-llama":
                assert f"positions_{i}_{j} = torch.ops.kvc.recompute_positions(" in dec
            assert f"put_recomputed_{i}_{j} = torch.ops.kvc.put_recomputed(" in dec
        for name in (f"prefetch_kv_{i}", f"wait_offloaded_{i}", f"wait_kv_ready_{i}",
                     f"put_new_{i}", f"staged_kv_{i}", f"record_slot_free_{i}"):
            assert f"{name} = " in dec
    # no fx counter suffixes on event nodes: a name says which event, never a duplicate count
    names = re.findall(r"^\s+((?:wait|record)_\w+) = ", code, re.M)
    assert all(re.fullmatch(r"(wait|record)_(offloaded|slot_free|kv_ready|act_data|kv_data)_\d+"
                            r"|(wait|record)_act_ready_\d+_\d+", n) for n in names), names


def test_retracing_a_model_gives_the_same_code():
    m = tiny("tiny-llama", layers=2)
    plan = plan_for(layers=2)
    first = compiled(m, plan).code
    assert compiled(m, plan).code == first
    assert not [k for k in vars(m) if k.startswith("_tensor_constant")]  # the model is not mutated


# --- flatten ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_flatten_calls_functionals_on_the_same_parameters(name):
    """Linear / LayerNorm / Embedding calls become their functionals reading the very
    parameters through flat aliases: no nn.Module call or __getattr__ chain left in the code,
    nothing duplicated in the module tree (the numbers: test_compiled_parity)."""
    m = tiny(name)
    plan = plan_for()
    gm = compiled(m, plan)
    assert "getattr(self.layers" not in gm.code
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    params = dict(gm.named_parameters())
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and "target" in n.meta.get("kvc", {})]
    assert reads
    for n in reads:
        dotted = n.meta["kvc"]["target"]
        assert getattr(gm, n.target) is gm.get_parameter(dotted) and n.target == "kvc_" + dotted.replace(".", "_")
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "target" in n.meta.get("kvc", {})]
    assert {n.target for n in calls} <= {F.linear, F.layer_norm, F.embedding}
    for n in calls:
        assert isinstance(gm.get_submodule(n.meta["kvc"]["target"]), (nn.Linear, nn.LayerNorm, nn.Embedding))
    names = list(params)
    assert not any(k.startswith("kvc_") for k in names) and len(names) == len(set(names))
    assert not any(k.startswith("kvc_") for k in gm.state_dict())


def test_flatten_aliases_see_a_data_swap():
    """The weight streamer points parameters at GPU slots with `.data =`: the aliases must
    follow, or a flattened graph would read stale weights."""
    m = tiny("tiny-opt")
    gm = compiled(m, plan_for())
    node = next(n for n in gm.graph.nodes if n.op == "get_attr"
                and n.meta.get("kvc", {}).get("target", "").endswith("k_proj.weight"))
    param = gm.get_parameter(node.meta["kvc"]["target"])
    new = torch.full_like(param, 3.0)
    param.data = new
    assert getattr(gm, node.target).data_ptr() == new.data_ptr()
