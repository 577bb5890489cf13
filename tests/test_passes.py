"""The graph passes, one at a time and as a pipeline, on hand-built fx graphs and traced presets.

What is asserted: which nodes each pass inserts, in what order per layer, what it records in
meta, that every pass is idempotent and refuses to run before the passes it needs, that DCE
keeps every side-effect node, that `gm.code` is plain readable Python, and (with a small
happens-before simulator of CUDA streams and events) that the stream schedule has no race:
no staged buffer is read before its copy lands or refilled while a layer still reads it, no
pool row is prefetched before its write-back lands, and no write-back reads a tensor before
compute made it. Each record/wait the streams pass inserts is shown to be necessary.
"""
# ruff: noqa: F405  (names come from pass_fixtures, shared by the three pass test files)
from __future__ import annotations

import pytest

from pass_fixtures import *  # noqa: F401,F403  (the toy decoder, plans and graph readers)

pytestmark = pytest.mark.usefixtures("one_thread")

def test_annotate_toy_pre_ln_finds_norm_output_and_kv_slice():
    gm = annotated(ToyDecoder(pre_ln=True))
    code_before = gm.code
    nodes = named(gm)
    for i, info in layers_meta(gm).items():
        act = nodes[info["activation"]]
        assert act.op == "call_module" and act.target == f"layers.{i}.norm"
        targets = {n.target for n in map(nodes.get, info["kv_slice"]) if n.op == "call_module"}
        assert targets == {f"layers.{i}.k_proj", f"layers.{i}.v_proj"}  # never q_proj
        slice_ops = [nodes[s] for s in info["kv_slice"]]
        assert any(n.target == torch.cos for n in slice_ops)  # the position path K reads
        assert nodes[info["positions"]].op == "placeholder"
        assert nodes[info["k"]] is op_arg(nodes[info["kv_write"]], "k")
        assert is_op(nodes[info["kv_read"]], "kv_read")
        assert act.meta["kvc"]["role"] == "activation"
        assert all(n.meta["kvc"]["role"] == "kv_slice" for n in slice_ops)
    assert gm.code == code_before  # annotations only


def test_annotate_toy_post_ln_activation_is_residual_stream():
    gm = annotated(ToyDecoder(pre_ln=False))
    nodes = named(gm)
    acts = [nodes[info["activation"]] for info in layers_meta(gm).values()]
    assert acts[0].target == "embed"  # layer 0 reads the embedding itself
    for i, act in enumerate(acts[1:], 1):  # later layers: the previous layer's output
        assert act.target is __import__("operator").add and layer_of(act) == i - 1


def test_annotate_refuses_k_from_another_token_path():
    gm = trace_step(ToyDecoder(leak=True), prefill=False)
    with pytest.raises(ValueError, match="cannot be recomputed"):
        Annotate()(gm)
    with pytest.raises(ValueError, match="cannot be recomputed"):  # the pipeline: same error
        run_pipeline(trace_step(ToyDecoder(leak=True), prefill=True), plan_for())


@pytest.mark.parametrize("prefill", [False, True])
def test_annotate_llama_pre_ln(prefill):
    gm = annotated(tiny("tiny-llama"), prefill)
    nodes = named(gm)
    for i, info in layers_meta(gm).items():
        act = nodes[info["activation"]]
        assert layer_of(act) == i
        assert any(f"layers.{i}.input_layernorm" in v[0] for v in act.meta["nn_module_stack"].values())
        assert {u.target for u in act.users} >= {f"layers.{i}.self_attn.{p}_proj" for p in "qkv"}
        names = info["kv_slice"]
        kinds = {getattr(nodes[s].target, "__name__", nodes[s].target) for s in names}
        assert {f"layers.{i}.self_attn.k_proj", f"layers.{i}.self_attn.v_proj",
                "unflatten", "sub", "cat", "mul", "getitem", "type_as"} <= kinds  # RoPE incl.
        # the cos/sin table lookup at the layer's positions
        assert f"layers.{i}.self_attn.q_proj" not in kinds
        assert info["kv_read"] is None if prefill else is_op(nodes[info["kv_read"]], "kv_read")


@pytest.mark.parametrize("pre_ln", [True, False])
def test_annotate_opt(pre_ln):
    gm = annotated(tiny("tiny-opt", do_layer_norm_before=pre_ln))
    nodes = named(gm)
    for i, info in layers_meta(gm).items():
        act = nodes[info["activation"]]
        if pre_ln:
            assert act.target == f"layers.{i}.self_attn_layer_norm"
        elif i == 0:  # token + position embeddings
            assert act.op == "call_function" and layer_of(act) is None
            assert {n.target for n in act.all_input_nodes} == {"embed_tokens", "embed_positions"}
        else:  # post-LN: the previous layer's output
            assert act.target == f"layers.{i - 1}.final_layer_norm"
        assert [getattr(nodes[s].target, "__name__", nodes[s].target) for s in info["kv_slice"]] == [
            f"layers.{i}.self_attn.k_proj", "unflatten", f"layers.{i}.self_attn.v_proj", "unflatten"]


# === offload ================================================================================

@pytest.mark.parametrize("prefill", [False, True])
def test_offload_replaces_kv_write_and_follows_activation(prefill):
    model = ToyDecoder()
    traced = trace_step(model, prefill=prefill)
    after_write = {op_arg(w, "layer"): w.next.name for w in ops(traced, "kv_write")}
    gm = annotated(model, prefill)
    Offload(plan_for())(gm)
    nodes = named(gm)
    assert not ops(gm, "kv_write")
    for i, info in layers_meta(gm).items():
        (kv,) = ops(gm, "offload_kv", i)
        assert kv.name == f"offload_kv_{i}" and kv.next.name == after_write[i]
        assert kv.args[:2] == (nodes[info["k"]], nodes[info["v"]])
        assert op_arg(kv, "stream") == OFFLOAD
        (act,) = ops(gm, "offload_act", i)
        assert act.name == f"offload_act_{i}" and act.prev is nodes[info["activation"]]
        assert act.args[0] is nodes[info["activation"]] and op_arg(act, "stream") == OFFLOAD
        assert act.meta["kvc"] == {"role": "offload", "layer": i, "stream": "offload"}


def test_offload_fraction_zero_ships_no_activations():
    gm = annotated(ToyDecoder())
    Offload(plan_for(fraction=0.0))(gm)
    assert not ops(gm, "offload_act") and len(ops(gm, "offload_kv")) == 3


def test_offload_leaves_resident_layers_alone():
    gm = annotated(ToyDecoder())
    Offload(plan_for(resident=(False, True, False)))(gm)
    assert [op_arg(w, "layer") for w in ops(gm, "kv_write")] == [1]
    assert {op_arg(n, "layer") for n in gm.graph.nodes if op_name(n) in COPY_OPS} == {0, 2}
    gm = annotated(ToyDecoder())
    assert Offload(plan_for("gpu_resident"))(gm).modified is False


# === recompute ==============================================================================

def test_recompute_clones_kv_slice_per_chunk_toy():
    model = ToyDecoder()
    read_users = {op_arg(r, "layer"): sorted(u.name for u in r.users)
                  for r in ops(trace_step(model, prefill=False), "kv_read")}
    gm = annotated(model)
    for p in (Offload, Recompute):
        p(plan_for(chunks=2))(gm)
    nodes = named(gm)
    assert not ops(gm, "kv_read")
    for i, info in layers_meta(gm).items():
        originals = [nodes[s] for s in info["kv_slice"]]
        inserted = [n for n in gm.graph.nodes if n.meta.get("kvc", {}).get("layer") == i
                    and n.meta["kvc"].get("role") in ("recompute", "put_new", "staged_kv")]
        # k_proj / v_proj (nn.Linear) read the activation: their clones read it token-major
        # and are transposed back under the original name (recompute.py's docstring)
        linear = {o.name for o in originals if o.op == "call_module" and o.target.endswith("_proj")}
        assert linear == {f"layers_{i}_k_proj", f"layers_{i}_v_proj"}
        expect = []
        for j in range(2):
            expect += [f"staged_act_{i}_{j}", f"positions_{i}_{j}"]
            for o in originals:
                if o.name in linear and f"re{i}_{j}_tm_act" not in expect:
                    expect.append(f"re{i}_{j}_tm_act")
                expect += [f"re{i}_{j}_tm_{o.name}"] if o.name in linear else []
                expect.append(f"re{i}_{j}_{o.name}")
            expect += [f"put_recomputed_{i}_{j}"]
        assert [n.name for n in inserted] == expect + [f"put_new_{i}", f"staged_kv_{i}"]
        for j in range(2):
            tm_act = nodes[f"re{i}_{j}_tm_act"]
            assert (tm_act.target, tm_act.args) == ("transpose", (nodes[f"staged_act_{i}_{j}"], 0, 1))
            for o in originals:
                c = nodes[f"re{i}_{j}_{o.name}"]
                if o.name in linear:  # [b, n, out] view of the token-major projection
                    tm = nodes[f"re{i}_{j}_tm_{o.name}"]
                    assert (c.target, c.args) == ("transpose", (tm, 0, 1))
                    assert tm.args == (tm_act,) and kvc_meta(tm)["layout"] == "token_major"
                    continue
                assert c.target == o.target  # same op, same weights (shared get_attr/modules)
                for a, b in zip(o.all_input_nodes, c.all_input_nodes):
                    if a.name == info["activation"]:
                        assert b.name == f"staged_act_{i}_{j}"
                    elif a.name == info["positions"]:
                        assert b.name == f"positions_{i}_{j}"
                    elif a in originals:
                        assert b.name == f"re{i}_{j}_{a.name}"
                    else:
                        assert b is a
            put = nodes[f"put_recomputed_{i}_{j}"]
            assert put.args[:2] == (nodes[f"re{i}_{j}_{info['k']}"], nodes[f"re{i}_{j}_{info['v']}"])
            assert (op_arg(put, "layer"), op_arg(put, "chunk")) == (i, j)
        put_new = nodes[f"put_new_{i}"]
        assert put_new.args[:2] == (nodes[info["k"]], nodes[info["v"]])  # this step's own K,V
        staged = nodes[f"staged_kv_{i}"]  # attention reads it where it read kv_read
        assert staged.prev is put_new and sorted(u.name for u in staged.users) == read_users[i]


def test_recompute_llama_clone_has_projection_rope_and_positions():
    spec_changes = {"model_type": "qwen2", "attention_bias": True}
    gm = annotated(tiny("tiny-llama", **spec_changes))
    for p in (Offload, Recompute):
        p(plan_for(chunks=1))(gm)
    nodes = named(gm)
    for i in layers_meta(gm):
        clone = [n for n in gm.graph.nodes if n.name.startswith(f"re{i}_0_")]
        targets = {getattr(n.target, "__name__", n.target) for n in clone}
        assert {f"layers.{i}.self_attn.k_proj", f"layers.{i}.self_attn.v_proj",
                "unflatten", "sub", "cat", "mul", "getitem", "type_as"} <= targets
        assert f"layers.{i}.self_attn.q_proj" not in targets
        assert set(nodes[f"positions_{i}_0"].users) <= set(clone)
        assert nodes[f"positions_{i}_0"].users  # RoPE reads the recomputed positions
        assert is_op(nodes[f"positions_{i}_0"], "recompute_positions")


def test_recompute_opt_reads_no_positions():
    gm = compiled(tiny("tiny-opt"), plan_for())
    assert not ops(gm, "recompute_positions") and len(ops(gm, "staged_act")) == 6


def test_recompute_fraction_zero_inserts_no_clones():
    gm = compiled(tiny("tiny-llama"), plan_for(fraction=0.0))
    assert not any(n.name.startswith("re") and n.name[2].isdigit() for n in gm.graph.nodes)
    assert not ops(gm, "staged_act") and not ops(gm, "recompute_positions")
    assert not ops(gm, "offload_act") and not ops(gm, "prefetch_act")
    assert not ops(gm, "put_recomputed")
    for i in range(3):
        assert [op_arg(n, "layer") for n in ops(gm, "put_new", i) + ops(gm, "staged_kv", i)] == [i, i]


def test_recompute_skips_prefill():
    gm = compiled(ToyDecoder(), plan_for(), prefill=True)
    assert not ops(gm, "staged_act") and not ops(gm, "staged_kv") and not ops(gm, "prefetch_kv")
    assert copy_names(gm) == [f"{o}_{i}" for i in range(3) for o in ("offload_act", "offload_kv")]


# === prefetch ===============================================================================

@pytest.mark.parametrize("model", ["toy", "tiny-llama", "tiny-opt"])
def test_prefetch_pipelined_one_layer_ahead(model):
    m = ToyDecoder() if model == "toy" else tiny(model)
    traced = annotated(m)
    firsts = {i: info["first"] for i, info in layers_meta(traced).items()}
    start = next(n for n in traced.graph.nodes if n.op not in ("placeholder", "get_attr")).name
    gm = compiled(m, plan_for("pipelined", chunks=2))
    nodes = named(gm)
    prefetches = [n for n in copy_names(gm) if n.startswith("prefetch")]
    expect = []
    for i in range(3):
        expect += [f"prefetch_act_{i}_0", f"prefetch_act_{i}_1", f"prefetch_kv_{i}"]
    assert prefetches == expect
    for i in range(3):
        anchor = start if i == 0 else firsts[i - 1]
        seq, n = [], nodes[f"prefetch_act_{i}_0"]
        for _ in range(4):
            seq.append(n.name)
            n = next_real(n)
        assert seq == [f"prefetch_act_{i}_0", f"prefetch_act_{i}_1", f"prefetch_kv_{i}", anchor]
        for name in seq[:3]:
            assert op_arg(nodes[name], "stream") == PREFETCH
            assert nodes[name].meta["kvc"]["stream"] == "prefetch"


def test_prefetch_kvpr_at_own_layer():
    m = tiny("tiny-llama")
    firsts = {i: info["first"] for i, info in layers_meta(annotated(m)).items()}
    gm = compiled(m, plan_for("kvpr", chunks=4))  # kvpr: one chunk, no lookahead
    nodes = named(gm)
    for i in range(3):
        assert next_real(nodes[f"prefetch_act_{i}_0"]).name == f"prefetch_kv_{i}"
        assert next_real(nodes[f"prefetch_kv_{i}"]).name == firsts[i]
    assert not ops(gm, "prefetch_act", 0)[1:]


def test_prefetch_fraction_zero_and_resident():
    gm = compiled(ToyDecoder(), plan_for(fraction=0.0, resident=(False, True, False)))
    # layer 2 is prefetched before layer 1 (resident) starts: after layer 0 wrote back
    assert copy_names(gm) == ["prefetch_kv_0", "offload_kv_0", "prefetch_kv_2", "offload_kv_2"]
    assert [op_arg(r, "layer") for r in ops(gm, "kv_read")] == [1]


def test_resident_layer_untouched():
    m = tiny("tiny-llama")
    traced = trace_step(m, prefill=False)
    flatten_targets(traced)  # the last pass rewrites every layer's module calls alike
    info = layers_meta(annotated(m))
    gm = compiled(m, plan_for(resident=(False, True, False)))

    def span(g):  # layer 1's nodes, from its first node to layer 2's first
        names, inside = [], False
        for n in g.graph.nodes:
            inside = (inside or n.name == info[1]["first"]) and n.name != info[2]["first"]
            if inside:
                names.append((n.name, str(n.target), [str(a) for a in n.args]))
        return names

    assert span(gm) == span(traced)
    inserted = [n for n in gm.graph.nodes if n.meta.get("kvc", {}).get("layer") == 1
                and n.meta["kvc"]["role"] not in ("activation", "kv_slice")]  # annotate's tags
    assert not inserted


# === streams ================================================================================

