"""The graph passes, one at a time and as a pipeline, on hand-built fx graphs and traced presets.

What is asserted: which nodes each pass inserts, in what order per layer, what it records in
meta, that every pass is idempotent and refuses to run before the passes it needs, that DCE
keeps every side-effect node, that `gm.code` is plain readable Python, and (with a small
happens-before simulator of CUDA streams and events) that the stream schedule has no race:
no staged buffer is read before its copy lands or refilled while a layer still reads it, no
pool row is prefetched before its write-back lands, and no write-back reads a tensor before
compute made it. Each record/wait the streams pass inserts is shown to be necessary.
"""
from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from kvc.models import build_model, preset
from kvc.models.spec import ModelSpec
from kvc.passes.annotate import Annotate
from kvc.passes.flatten import flatten_targets
from kvc.passes.nodes import is_op, kvc_meta, layer_of, op_arg, op_name
from kvc.passes.offload import Offload
from kvc.passes.pipeline import ORDER, build_passes, run_pipeline
from kvc.passes.recompute import Recompute
from kvc.passes.streams import (ACT_DATA, ACT_READY, KV_DATA, KV_READY, OFFLOADED, SLOT_FREE,
                                event_id, num_events)
from kvc.ir.plan import Plan, forced_plan
from kvc.ir.ops import COMPUTE, OFFLOAD, PREFETCH
from kvc.compiler.trace import trace_step
from stream_simulator import COPY_OPS, VIEW_OPS, is_view, simulate, sources  # noqa: F401

H, HEADS = 8, 2
PUT_OPS = ("put_recomputed", "put_new")  # assemble K,V in the staging slot, on compute
EFFECT_OPS = COPY_OPS + PUT_OPS + ("record_event", "wait_event", "kv_write")


pytestmark = pytest.mark.usefixtures("one_thread")


# --- a hand-built decoder that keeps the model forward contract ----------------------------

class ToyLayer(nn.Module):
    """pre_ln: K,V read norm(x); post-LN: they read the residual stream x itself. `leak` adds
    the raw embedding to K: a token path other than the activation (not recomputable)."""

    def __init__(self, i: int, pre_ln: bool, leak: bool):
        super().__init__()
        self.i, self.pre_ln, self.leak = i, pre_ln, leak
        self.norm = nn.LayerNorm(H)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(H, H) for _ in range(4))
        self.mlp = nn.Linear(H, H)

    def forward(self, x, rot, e, rt, prefill: bool):
        a = self.norm(x) if self.pre_ln else x
        k = self.k_proj(a) * rot  # a position-dependent K, like RoPE
        if self.leak:
            k = k + e
        k = k.unflatten(-1, (HEADS, H // HEADS))
        v = self.v_proj(a).unflatten(-1, (HEADS, H // HEADS))
        torch.ops.kvc.kv_write(k, v, rt, self.i)
        q = self.q_proj(a).unflatten(-1, (HEADS, H // HEADS)).transpose(1, 2)
        if prefill:
            out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        else:
            kv = torch.ops.kvc.kv_read(rt, self.i)
            k_all = torch.cat([kv[0], k], dim=1).transpose(1, 2)
            v_all = torch.cat([kv[1], v], dim=1).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k_all, v_all)
        x = x + self.o_proj(out.transpose(1, 2).flatten(-2))
        if not self.pre_ln:
            x = self.norm(x)
        return x + self.mlp(torch.relu(x))


class ToyDecoder(nn.Module):
    def __init__(self, layers=3, pre_ln=True, leak=False, vocab=32):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, H)
        self.layers = nn.ModuleList([ToyLayer(i, pre_ln, leak) for i in range(layers)])
        self.head = nn.Linear(H, vocab)

    def forward(self, input_ids, positions, rt, prefill=False, last_only=False):
        e = self.embed(input_ids)
        rot = torch.cos(positions.float() * 0.1)[:, None]
        x = e
        for layer in self.layers:
            x = layer(x, rot, e, rt, prefill)
        if last_only:
            x = x[:, -1:]
        return self.head(x)


def toy_spec(layers=3, vocab=32) -> ModelSpec:
    """Shapes only: what CompiledModel / ReferenceDecoder read to size caches."""
    return ModelSpec(model_type="opt", vocab_size=vocab, hidden_size=H, num_layers=layers,
                     num_heads=HEADS, num_kv_heads=HEADS, intermediate_size=H, max_positions=64)


def tiny(name: str, layers: int = 3, **changes) -> torch.nn.Module:
    base = "tiny-opt" if name.startswith("tiny-opt") else name
    spec = replace(preset(base), num_layers=layers, **changes)
    return build_model(spec, "cpu", torch.float32, seed=0)


def plan_for(mode="pipelined", layers=3, fraction=0.5, chunks=2, resident=None) -> Plan:
    plan = forced_plan(mode, layers, 6, 8, 64, fraction, act_chunks=chunks)
    return plan if resident is None else replace(plan, resident=tuple(resident))


def compiled(model, plan, prefill=False) -> torch.fx.GraphModule:
    return run_pipeline(trace_step(model, prefill=prefill), plan)


def annotated(model, prefill=False) -> torch.fx.GraphModule:
    gm = trace_step(model, prefill=prefill)
    Annotate()(gm)
    return gm


# --- small graph helpers --------------------------------------------------------------------

def named(gm) -> dict[str, torch.fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def is_event(n) -> bool:
    return is_op(n, "record_event") or is_op(n, "wait_event")


def next_real(n):
    """The next node that is not an event record/wait."""
    n = n.next
    while is_event(n):
        n = n.next
    return n


def ops(gm, name, layer=None) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes
            if is_op(n, name) and (layer is None or op_arg(n, "layer") == layer)]


def copy_names(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if op_name(n) in COPY_OPS]


def event_args(n):
    return op_arg(n, "stream"), op_arg(n, "event")


def layers_meta(gm) -> dict:
    return gm.meta["kvc"]["layers"]


# === annotate ===============================================================================

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

def test_streams_pairs_per_layer():
    plan = plan_for(chunks=2)
    m = tiny("tiny-llama")
    gm = compiled(m, plan)
    nodes = named(gm)
    info = layers_meta(gm)
    for i in range(3):
        for j in range(2):
            ev = event_id(plan, i, ACT_READY, j)
            assert event_args(nodes[f"prefetch_act_{i}_{j}"].next) == (PREFETCH, ev)
            assert is_op(nodes[f"staged_act_{i}_{j}"].prev, "wait_event")
            assert event_args(nodes[f"staged_act_{i}_{j}"].prev) == (COMPUTE, ev)
        assert event_args(nodes[f"prefetch_kv_{i}"].next) == (PREFETCH, event_id(plan, i, KV_READY))
        assert event_args(nodes[f"staged_kv_{i}"].prev) == (COMPUTE, event_id(plan, i, KV_READY))
        # before the layer's first copy: its newest pool rows landed, and its slot is free
        first = nodes[f"prefetch_act_{i}_0"]
        prev_user = {0: 2, 1: 1, 2: 0}[i]  # 3 offloaded layers, 2 slots, cyclic across steps
        assert [event_args(first.prev.prev), event_args(first.prev)] == [
            (PREFETCH, event_id(plan, i, OFFLOADED)), (PREFETCH, event_id(plan, prev_user, SLOT_FREE))]
        # the slot is free once attention (reached through views of staged_kv) has read it
        (attn,) = [n for n in gm.graph.nodes if n.op == "call_function" and layer_of(n) == i
                   and "scaled_dot_product_attention" in str(n.target)]
        assert nodes[f"staged_kv_{i}"] in sources(attn)
        rec = attn.next
        assert is_op(rec, "record_event") and event_args(rec) == (COMPUTE, event_id(plan, i, SLOT_FREE))
        # write-back: record on compute after the producer, wait on offload before the copy
        act = nodes[info[i]["activation"]]
        assert [event_args(act.next), event_args(act.next.next)] == [
            (COMPUTE, event_id(plan, i, ACT_DATA)), (OFFLOAD, event_id(plan, i, ACT_DATA))]
        assert act.next.next.next.name == f"offload_act_{i}"
        kv = nodes[f"offload_kv_{i}"]
        assert event_args(kv.prev) == (OFFLOAD, event_id(plan, i, KV_DATA))
        assert event_args(kv.next) == (OFFLOAD, event_id(plan, i, OFFLOADED))
    ids = [op_arg(n, "event") for n in gm.graph.nodes if is_event(n)]
    assert 0 <= min(ids) and max(ids) < num_events(plan) == gm.meta["kvc"]["num_events"]


def test_streams_tag_every_node():
    gm = compiled(tiny("tiny-opt"), plan_for())
    for n in gm.graph.nodes:
        stream = n.meta["kvc"]["stream"]
        if op_name(n) in COPY_OPS or is_event(n):
            assert {"compute": COMPUTE, "prefetch": PREFETCH, "offload": OFFLOAD}[stream] == op_arg(n, "stream")
        else:
            assert stream == "compute", n.name


# --- the happens-before simulator (tests/stream_simulator.py) on real schedules -------------

def steps(model, plan, decode_steps=4):
    pre, dec = compiled(model, plan, prefill=True), compiled(model, plan)
    return pre, dec, [pre] + [dec] * decode_steps


SCHEDULES = [("pipelined", 0.5, 2, None), ("pipelined", 1.0, 3, None), ("pipelined", 0.0, 2, None),
             ("kvpr", 0.5, 1, None), ("full_offload", 0.3, 1, None),
             ("pipelined", 0.5, 2, (False, True, False)), ("kvpr", 0.5, 1, (True, False, False)),
             ("pipelined", 0.5, 2, (True, False, True))]


@pytest.mark.parametrize("layers", [2, 3])
@pytest.mark.parametrize("mode,fraction,chunks,resident", SCHEDULES)
def test_streams_schedule_has_no_race(layers, mode, fraction, chunks, resident):
    if resident is not None and layers == 2:
        resident = resident[:2]
    plan = plan_for(mode, layers, fraction, chunks, resident)
    _, _, graphs = steps(ToyDecoder(layers=layers), plan)
    assert simulate(plan, graphs) == []


@pytest.mark.parametrize("layers,fraction", [(2, 0.5), (2, 0.0), (3, 0.5)])
def test_every_event_node_is_needed(layers, fraction):
    """Negative control: drop any one record or wait from the decode graph and the simulator
    finds a race, so it would catch a missing pair, and the pass inserts none in vain.

    One exception, with 3 offloaded layers: layer 1 is the only user of slot 1, and the
    prefetch stream already waited (for layer 0's copies, earlier in the same step) until
    layer 2 freed slot 0 in the previous step, which is after layer 1 freed slot 1 there:
    wait_slot_free_1 (and so record_slot_free_1, its only waiter) is implied. Harmless, and
    kept: the rule is simpler than the exception."""
    plan = plan_for("pipelined", layers, fraction, 2)
    _, dec, graphs = steps(tiny("tiny-llama", layers=layers), plan)
    assert simulate(plan, graphs) == []
    implied = {"wait_slot_free_1", "record_slot_free_1"} if layers == 3 else set()
    for n in [n for n in dec.graph.nodes if is_event(n)]:
        found = simulate(plan, graphs, skip=(dec, {n.name}))
        assert bool(found) != (n.name in implied), f"{n.name}: {found}"


def test_simulator_sees_a_late_prefetch():
    """A prefetch issued after its reader (here: moved to the graph's end) is a race."""
    plan = plan_for("pipelined", 3, 0.5, 1)
    _, dec, graphs = steps(ToyDecoder(), plan)
    block = [n for n in dec.graph.nodes if n.meta.get("kvc", {}).get("layer") == 1
             and n.meta["kvc"].get("stream") == "prefetch"]
    out = next(n for n in dec.graph.nodes if n.op == "output")
    for n in block:
        out.prepend(n)
    assert any("landed" in p or "another layer" in p for p in simulate(plan, graphs))


# === the pipeline: order, idempotence, prerequisites, DCE, readable code =====================

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
    for op, args in _OP_CALL.findall(code):  # ids only: rt and plain integers
        for a in args.split(","):
            assert re.fullmatch(r"\s*(rt|[a-z_0-9]+|\w+ = -?\d+)\s*", a), (op, a)
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
