"""Bytes and FLOPs of one decode step, from shapes alone. Units: bytes, FLOPs; GB is 1e9 bytes."""
from __future__ import annotations

import numpy as np

from kvc.dtypes import dtype_bytes  # noqa: F401  (cost.dtype_bytes)
from kvc.models import layer_param_count, param_count
from kvc.models.spec import ModelSpec

GB = 1e9


def layer_contexts(spec: ModelSpec, s, shares: int = 1) -> np.ndarray:
    """[layers, *shape(s)]: the cached tokens each layer's decode step reads at context s (an
    int or an array): ModelSpec.cached_tokens, s itself but for a sliding-window layer. The
    planner prices every layer's copies, recompute, attention and staging at this context.
    `shares` > 1 (a token split, Plan.context_shares): s is a rank's share of the context and
    a sliding-window layer's w - 1 cached tokens are cut into as many shares too, so it reads
    at most ceil((w - 1) / shares) of them."""
    s = np.asarray(s, dtype=np.int64)
    out = np.empty((spec.num_layers,) + s.shape, dtype=np.int64)
    for i in range(spec.num_layers):
        w = spec.window(i)
        out[i] = s if w is None else np.clip(s, 0, max(0, -(-(w - 1) // shares)))
    return out


def longest_context(spec: ModelSpec, s: int) -> int:
    """The most cached tokens any layer reads at context s."""
    return max((spec.cached_tokens(i, s) for i in range(spec.num_layers)), default=s)


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
