"""DeviceCache: the plain device-resident KV cache (reference decoder and gpu_resident layers).

Token-major storage `[max_tokens, b, n_kv, hd]` per layer, like the CPU pools, so that one
layout serves every schedule. `s` is the number of cached tokens; the executor advances it
after each forward.

A layer with a sliding window W (ModelSpec.window) reads only its window: rows
[s - min(s, W-1), s+t), the new token's W-1 predecessors and the step's own rows
(ModelSpec.cached_tokens); the rows before it are kept but never read.
"""
from __future__ import annotations

import torch

from kvc.runtime.padding import Padding


class DeviceCache:
    def __init__(self, layers: int | list[int], batch: int, max_tokens: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 windows: dict[int, int | None] | None = None):
        """`layers`: how many (all of them), or which layer indices this cache holds.
        `windows`: layer -> its sliding window (None or absent: it attends to every row)."""
        shape = (max_tokens, batch, num_kv_heads, head_dim)
        ids = range(layers) if isinstance(layers, int) else layers
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in ids}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in ids}
        self.windows = {i: w for i, w in (windows or {}).items() if w is not None and i in self.k}
        self.max_tokens = max_tokens
        self.s = 0
        self.t = 0  # tokens of the step in flight, written at [s, s+t)
        self.padding: Padding | None = None  # a left-padded batch's (kvc.runtime.padding)
        self.no_mask = torch.empty(0, dtype=torch.bool, device=device)

    def _lo(self, layer: int) -> int:
        """The first row the layer reads: 0, or the start of its window."""
        w = self.windows.get(layer)
        return 0 if w is None else self.s - max(0, min(self.s, w - 1))

    def kv_read(self, layer: int):
        n, lo = self.s + self.t, self._lo(layer)
        return self.k[layer][lo:n].transpose(0, 1), self.v[layer][lo:n].transpose(0, 1)

    def kv_mask(self, layer: int, rows: slice = slice(None)):
        """The padding mask for what kv_read returns (empty: the batch has no padding);
        `rows`: this cache's rows of the padding (a micro-batch's)."""
        if self.padding is None:
            return self.no_mask
        return self.padding.mask(rows, self._lo(layer), self.s, self.t, self.windows.get(layer))

    def cpu_attn_begin(self, q, layer: int, scale: float, softcap: float) -> int:
        """No CPU attention lane here: every row is on the device."""
        return -1

    def kv_write(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> None:
        t = k.shape[1]
        if self.s + t > self.max_tokens:
            raise RuntimeError(f"KV cache full: {self.s} + {t} tokens > capacity {self.max_tokens}")
        self.t = t
        self.k[layer][self.s:self.s + t].copy_(k.transpose(0, 1))
        self.v[layer][self.s:self.s + t].copy_(v.transpose(0, 1))

    def advance(self, tokens: int) -> None:
        self.s += tokens
        self.t = 0

    def reset(self) -> None:
        self.s = 0
