"""Bytes and FLOPs of one decode step, from shapes alone. Units: bytes, FLOPs; GB is 1e9 bytes."""
from __future__ import annotations

from kvc.dtypes import dtype_bytes  # noqa: F401  (cost.dtype_bytes)
from kvc.models import layer_param_count, param_count
from kvc.models.spec import ModelSpec

GB = 1e9


def act_bytes(spec: ModelSpec, b: int, tokens, p: int):
    """A layer's input activations for `tokens` cached tokens: what ships instead of K,V."""
    return b * tokens * spec.hidden_size * p


def kv_bytes(spec: ModelSpec, b: int, tokens, p: int):
    return 2 * b * tokens * spec.kv_width * p


def recompute_flops(spec: ModelSpec, b: int, tokens):
    """K and V projections of `tokens` activations: 2 GEMMs of [b*l, h] @ [h, h_kv]."""
    return 2 * b * tokens * spec.hidden_size * 2 * spec.kv_width


def weight_bytes(spec: ModelSpec, p: int) -> int:
    return param_count(spec) * p


def layer_weight_bytes(spec: ModelSpec, p: int) -> int:
    """One decoder layer's parameters: what a weight-streamed layer copies each step."""
    return layer_param_count(spec) * p


def writeback_bytes(spec: ModelSpec, b: int, p: int) -> int:
    """The new token's activation and K,V, back to the CPU pools each step (per layer)."""
    return b * (spec.hidden_size + 2 * spec.kv_width) * p
