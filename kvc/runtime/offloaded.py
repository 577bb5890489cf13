"""OffloadedCache: the runtime behind an offloaded schedule.

Per offloaded layer, pinned token-major CPU pools `[max_tokens, b, ...]` for the layer's
input activations and for K and V, so that any token range is one contiguous block. Per
staging slot (Plan.staging_slots: two for double buffering, one for kvpr), GPU buffers the
prefetch copies land in.
Resident layers keep a DeviceCache. Everything is allocated once, here.

At each step the executor calls `begin_step(s, t)`: the plan gives l per layer for context s,
and tokens [0, l) are recomputed from activations in `act_chunks` chunks, [l, s) arrive as K,V.
The staging slot's K,V buffers are assembled in place, in token order: recomputed rows
[0, l) (put_recomputed), copied rows [l, s) (prefetch_kv), the step's own rows [s, s+t)
(put_new); attention then reads rows [0, s+t) of one buffer (staged_kv).
"""
from __future__ import annotations

import math

import torch

from kvc.plan import Plan
from kvc.runtime.device_cache import DeviceCache
from kvc.runtime.pinned import check_host_memory, pinned_empty
from kvc.runtime.streams import StreamSet


def chunk_bounds(l: int, chunks: int) -> list[int]:
    """Split [0, l) into `chunks` contiguous ranges of near-equal size (some may be empty)."""
    return [(l * j) // chunks for j in range(chunks + 1)]


class OffloadedCache:
    def __init__(self, plan: Plan, *, num_layers: int, batch: int, max_tokens: int,
                 act_width: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, num_events: int, weights=None):
        self.plan, self.batch, self.max_tokens = plan, batch, max_tokens
        self.weights = weights  # a WeightStreamer when the plan streams any layer's weights
        self.device = torch.device(device)
        self.streams = StreamSet(self.device, num_events)
        self.offloaded = [i for i in range(num_layers) if not plan.resident[i]]
        n_off = len(self.offloaded)
        kv_shape = (max_tokens, batch, num_kv_heads, head_dim)
        # activations are read back only for recomputed tokens: rows [0, max l)
        self.act_rows = min(max_tokens, plan.max_recompute_tokens(max_tokens))
        act_shape = (self.act_rows, batch, act_width)
        item = torch.empty((), dtype=dtype).element_size()
        # what is pinned: these pools, and the streamed weights' pool already pinned beside them
        check_host_memory(n_off * (math.prod(act_shape) + 2 * math.prod(kv_shape)) * item
                          + (weights.nbytes if weights is not None else 0))
        # one allocation per kind: pool[i] is a contiguous block; pinned so copies are DMA
        shapes = [(n_off, *act_shape), (n_off, *kv_shape), (n_off, *kv_shape)]
        self.act_pool, self.k_pool, self.v_pool = (pinned_empty(sh, dtype, self.device) for sh in shapes)
        self.pool_index = {layer: j for j, layer in enumerate(self.offloaded)}
        slots = min(plan.staging_slots, n_off)
        self.act_stage = torch.empty((slots, *act_shape), dtype=dtype, device=self.device)
        self.k_stage = torch.empty((slots, *kv_shape), dtype=dtype, device=self.device)
        self.v_stage = torch.empty((slots, *kv_shape), dtype=dtype, device=self.device)
        resident = [i for i in range(num_layers) if plan.resident[i]]
        self.resident = DeviceCache(resident, batch, max_tokens,
                                    num_kv_heads, head_dim, dtype, self.device)
        self.positions = torch.arange(max_tokens, device=self.device)
        self.s = 0
        self.bounds: dict[int, list[int]] = {}

    @property
    def host_bytes(self) -> int:
        """Bytes of the CPU pools (what cost.host_pool_bytes predicts)."""
        return sum(p.nbytes for p in (self.act_pool, self.k_pool, self.v_pool))

    def close(self) -> None:
        """Wait for the copies still reading or writing the pools, so they can be freed."""
        self.streams.synchronize()

    # --- step bookkeeping (host side only: no device work, no sync) ----------------------
    def begin_step(self, s: int, t: int = 1) -> None:
        self.s, self.t = s, t
        self.resident.s = s
        if s == 0:
            self.bounds = {}
            return
        chunks = self.plan.act_chunks
        self.bounds = {i: chunk_bounds(self.plan.recompute_tokens(i, s), chunks)
                       for i in self.offloaded}

    def end_step(self, tokens: int) -> None:
        self.s += tokens
        self.resident.advance(0)

    def _slot(self, layer: int) -> int:
        return self.pool_index[layer] % self.plan.staging_slots

    # --- resident layers: the logical cache verbs ----------------------------------------
    def kv_read(self, layer: int):
        return self.resident.kv_read(layer)

    def kv_write(self, k, v, layer: int) -> None:
        self.resident.kv_write(k, v, layer)

    # --- offload: new tokens to the CPU pools -------------------------------------------
    def _to_pool(self, pool: torch.Tensor, x: torch.Tensor, stream: int) -> None:
        t = min(x.shape[1], pool.shape[0] - self.s)  # rows past the pool are never read
        if t <= 0:
            return
        with self.streams.use(stream):
            self.streams.keep_alive(x, stream)
            pool[self.s:self.s + t].copy_(x[:, :t].transpose(0, 1), non_blocking=True)

    def offload_act(self, h, stream: int, layer: int) -> None:
        self._to_pool(self.act_pool[self.pool_index[layer]], h, stream)

    def offload_kv(self, k, v, stream: int, layer: int) -> None:
        j = self.pool_index[layer]
        self._to_pool(self.k_pool[j], k, stream)
        self._to_pool(self.v_pool[j], v, stream)

    # --- prefetch: CPU pools -> staging --------------------------------------------------
    def prefetch_act(self, stream: int, layer: int, chunk: int) -> None:
        lo, hi = self.bounds[layer][chunk], self.bounds[layer][chunk + 1]
        if hi > lo:
            with self.streams.use(stream):
                self.act_stage[self._slot(layer)][lo:hi].copy_(
                    self.act_pool[self.pool_index[layer]][lo:hi], non_blocking=True)

    def prefetch_kv(self, stream: int, layer: int) -> None:
        l, s = self.bounds[layer][-1], self.s
        if s > l:
            j, slot = self.pool_index[layer], self._slot(layer)
            with self.streams.use(stream):
                self.k_stage[slot][l:s].copy_(self.k_pool[j][l:s], non_blocking=True)
                self.v_stage[slot][l:s].copy_(self.v_pool[j][l:s], non_blocking=True)

    def staged_act(self, layer: int, chunk: int):
        lo, hi = self.bounds[layer][chunk], self.bounds[layer][chunk + 1]
        return self.act_stage[self._slot(layer)][lo:hi].transpose(0, 1)

    def put_recomputed(self, k, v, layer: int, chunk: int) -> None:
        lo, hi, slot = self.bounds[layer][chunk], self.bounds[layer][chunk + 1], self._slot(layer)
        self.k_stage[slot][lo:hi].copy_(k.transpose(0, 1))
        self.v_stage[slot][lo:hi].copy_(v.transpose(0, 1))

    def put_new(self, k, v, layer: int) -> None:
        s, t, slot = self.s, k.shape[1], self._slot(layer)
        self.k_stage[slot][s:s + t].copy_(k.transpose(0, 1))
        self.v_stage[slot][s:s + t].copy_(v.transpose(0, 1))

    def staged_kv(self, layer: int):
        n, slot = self.s + self.t, self._slot(layer)
        return self.k_stage[slot][:n].transpose(0, 1), self.v_stage[slot][:n].transpose(0, 1)

    def recompute_positions(self, layer: int, chunk: int):
        return self.positions[self.bounds[layer][chunk]:self.bounds[layer][chunk + 1]]

    # --- weights: a streamed layer's CPU pool -> its GPU weight slot ---------------------
    def prefetch_weights(self, stream: int, layer: int) -> None:
        self.weights.prefetch(self.streams, stream, layer)

    # --- events --------------------------------------------------------------------------
    def record_event(self, stream: int, event: int) -> None:
        self.streams.record(stream, event)

    def wait_event(self, stream: int, event: int) -> None:
        self.streams.wait(stream, event)
