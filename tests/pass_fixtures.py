"""What the pass tests share: a hand-built decoder that keeps the model forward contract,
plans, and readers of the rewritten graphs."""
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
from kvc.passes.streams import (  # noqa: F401
    ACT_DATA,
    ACT_READY,
    KV_DATA,
    KV_READY,
    OFFLOADED,
    SLOT_FREE,
    event_id,
    num_events,
)
from kvc.ir.plan import Plan, forced_plan
from kvc.ir.ops import COMPUTE, OFFLOAD, PREFETCH
from kvc.compiler.trace import trace_step
from stream_simulator import COPY_OPS, VIEW_OPS, is_view, simulate, sources  # noqa: F401

H, HEADS = 8, 2
PUT_OPS = ("put_recomputed", "put_new")  # assemble K,V in the staging slot, on compute
EFFECT_OPS = COPY_OPS + PUT_OPS + ("record_event", "wait_event", "kv_write")



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


__all__ = ["ACT_DATA", "ACT_READY", "Annotate", "COMPUTE", "COPY_OPS", "EFFECT_OPS", "F", "KV_DATA", "KV_READY", "ModelSpec", "OFFLOAD", "OFFLOADED", "ORDER", "Offload", "PREFETCH", "PUT_OPS", "Plan", "Recompute", "SLOT_FREE", "ToyDecoder", "ToyLayer", "VIEW_OPS", "annotated", "build_model", "build_passes", "compiled", "copy_names", "event_args", "event_id", "flatten_targets", "forced_plan", "is_event", "is_op", "is_view", "kvc_meta", "layer_of", "layers_meta", "named", "next_real", "nn", "num_events", "op_arg", "op_name", "ops", "plan_for", "preset", "pytest", "re", "replace", "run_pipeline", "simulate", "sources", "tiny", "torch", "toy_spec", "trace_step"]
