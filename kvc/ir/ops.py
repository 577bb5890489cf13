"""torch.library ops through which a graph touches the KV cache and the runtime.

Each op looks up the runtime object by its integer id and calls the verb of the same name,
so one traced graph runs against a device cache (reference, gpu_resident) or against
offloaded pools and streams. Ops with side effects are registered with
`torch.fx.node.has_side_effect`, so dead-code elimination keeps them.

Cache layout seen by the model: K and V are [b, T, n_kv_heads, head_dim], RoPE applied.
A layer writes its new tokens first (`kv_write`, rows [s, s+T)), then reads the whole cache
(`kv_read`, rows [0, s+T), its own tokens included): the runtime assembles K,V in place, so
attention reads one buffer and no step concatenates (copies) the cache.
"""
from __future__ import annotations

import torch
import torch.fx

from kvc.ir import registry

_lib = torch.library.Library("kvc", "DEF")
_KEY = "CompositeExplicitAutograd"

# name -> (schema, has side effects)
_SCHEMAS: dict[str, tuple[str, bool]] = {
    # logical cache I/O, written by the models
    "kv_read": ("kv_read(int rt, int layer) -> (Tensor, Tensor)", False),
    "kv_write": ("kv_write(Tensor k, Tensor v, int rt, int layer) -> ()", True),
    # the batch's padding mask for the rows kv_read returns ([b, 1, T, S] bool; empty: none)
    "kv_mask": ("kv_mask(int rt, int layer) -> Tensor", False),
    # the CPU attention lane: hand the step's query to the CPU for the unit's oldest cached
    # rows; returns the unit for kvc.models.attend to collect the part from, or -1: none
    "cpu_attn_begin": ("cpu_attn_begin(Tensor q, int rt, int layer, float scale, float softcap) -> int", True),
    # offload: the new tokens' activation and K,V to the CPU pools at rows [s, s+T)
    "offload_act": ("offload_act(Tensor h, int rt, int stream, int layer) -> ()", True),
    "offload_kv": ("offload_kv(Tensor k, Tensor v, int rt, int stream, int layer) -> ()", True),
    # prefetch: CPU pools -> GPU staging slot of the layer (activation chunks, then the K,V tail)
    "prefetch_act": ("prefetch_act(int rt, int stream, int layer, int chunk) -> ()", True),
    "prefetch_kv": ("prefetch_kv(int rt, int stream, int layer) -> ()", True),
    # weight streaming: a layer's pinned CPU weight pool -> its GPU weight slot
    "prefetch_weights": ("prefetch_weights(int rt, int stream, int layer) -> ()", True),
    # assemble K,V in the staging slot: recomputed chunks at rows [lo, hi), new tokens at [s, s+T)
    "put_recomputed": ("put_recomputed(Tensor k, Tensor v, int rt, int layer, int chunk) -> ()", True),
    "put_new": ("put_new(Tensor k, Tensor v, int rt, int layer) -> ()", True),
    # views of what prefetch staged; layout [b, tokens, ...] like the model's tensors
    "staged_act": ("staged_act(int rt, int layer, int chunk) -> Tensor", False),
    "staged_kv": ("staged_kv(int rt, int layer) -> (Tensor, Tensor)", False),
    "recompute_positions": ("recompute_positions(int rt, int layer, int chunk) -> Tensor", False),
    # stream ordering: no buffer read before its copy ends or overwritten while in use
    "record_event": ("record_event(int rt, int stream, int event) -> ()", True),
    "wait_event": ("wait_event(int rt, int stream, int event) -> ()", True),
}

COMPUTE, PREFETCH, OFFLOAD = 0, 1, 2  # stream ids
STREAM_NAMES = {COMPUTE: "compute", PREFETCH: "prefetch", OFFLOAD: "offload"}


# --- each verb: the op's implementation, and the executor's direct call -----------------------
# A torch.library op reaches its Python implementation through the C++ dispatcher and back,
# which costs the host 6-15 µs per call (dev VM, 2026-11-28: record_event 6.8 µs through
# torch.ops, 0.3 µs called directly; prefetch_kv 31.9 against 16.4). The passes need the ops
# (schemas, side effects that dead-code elimination keeps); the executor runs a copy of the
# lowered graphs whose kvc calls go straight to the same function (`direct_calls`): same
# verbs, same arguments, same order.

def _verb(name: str, schema: str):
    """registry[rt].<name>(every other argument, in order), by position or, as the passes
    write stream / event / layer / chunk, by name."""
    names = [a.strip().split(" ")[-1] for a in schema.split("(", 1)[1].split(")", 1)[0].split(",")]
    idx = names.index("rt")

    def call(*args, **kwargs):
        if kwargs:
            args = args + tuple(kwargs[n] for n in names[len(args):])
        return getattr(registry.get(args[idx]), name)(*args[:idx], *args[idx + 1:])

    call.__name__ = call.__qualname__ = f"direct_{name}"
    call.__module__ = __name__
    call.kvc_op = name  # what kvc.ir.graph.op_name reports for it
    return call


DIRECT = {name: _verb(name, schema) for name, (schema, _) in _SCHEMAS.items()}
globals().update({f.__name__: f for f in DIRECT.values()})


def define(name: str, schema: str, side_effect: bool) -> None:
    _lib.define(schema)
    _lib.impl(name, DIRECT[name], _KEY)
    if side_effect:
        packet = getattr(torch.ops.kvc, name)
        torch.fx.node.has_side_effect(packet)
        torch.fx.node.has_side_effect(packet.default)


for _name, (_schema, _effect) in _SCHEMAS.items():
    define(_name, _schema, _effect)
