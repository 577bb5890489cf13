"""OffloadedCache: the runtime behind an offloaded schedule.

Per offloaded layer, pinned token-major CPU pools `[rows, b, ...]` for the layer's input
activations and for K and V, so that any token range is one contiguous block. They keep only
the rows the plan reads back: activations of rows [0, max l) (the recomputed ones), K,V of
rows [kv_lo, max_tokens), kv_lo the lowest l at any context the cache serves
(Plan.min_kv_row). When the planner recomputes nearly everything, that is a few chunks. Per
staging slot (Plan.staging_slots: two for double buffering, one for kvpr), GPU buffers the
prefetch copies land in.
Resident layers keep a DeviceCache. Everything is allocated once, here.

At each step the executor calls `begin_step(s, t)`: the plan gives l per layer for context s,
and tokens [0, l) are recomputed from activations in `act_chunks` chunks, [l, s) arrive as K,V.
The staging slot's K,V buffers are assembled in place, in token order: recomputed rows
[0, l) (put_recomputed), copied rows [l, s) (prefetch_kv), the step's own rows [s, s+t)
(put_new); attention then reads rows [0, s+t) of one buffer (staged_kv).

Sliding windows. A unit whose layer attends through a window W (`windows`, per unit) reads
only the last n = min(s, W-1) cached rows (ModelSpec.cached_tokens): with lo = s - n, the
plan's l counts from lo (and is capped at n), tokens [lo, lo+l) are recomputed, [lo+l, s)
copied as K,V, and the staging slot holds token lo + r at row r: recomputed rows [0, l),
copied [l, n), the new token at [n, n+t); attention reads rows [0, n+t), recompute_positions
gives the absolute positions lo + r. Nothing before lo is copied or recomputed. Such a unit's
pools keep the rows its contexts read, which move with s: activations of
[min lo, max(lo+l)), K,V of [min(lo+l), max_tokens) (`act_base`, `kv_base`: the first token
each pool keeps, per unit). All units share one pool shape: the largest of those spans, so a
windowed unit's pools are no smaller than a full unit's when the model has both.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kvc.errors import KvcError
from kvc.ir.ops import COMPUTE, OFFLOAD
from kvc.ir.plan import Plan
from kvc.models.attend import merge
from kvc.runtime.cpu_attention import CpuLane
from kvc.runtime.device_cache import DeviceCache
from kvc.runtime.lane_guard import LaneGuard, StepClock
from kvc.runtime.padding import Padding
from kvc.runtime.pinned import check_host_memory, pinned_empty
from kvc.runtime.streams import StreamSet


class _Views(NamedTuple):
    """One offloaded layer's staging slot and CPU pool rows (OffloadedCache.views)."""
    act_stage: torch.Tensor
    k_stage: torch.Tensor
    v_stage: torch.Tensor
    act_pool: torch.Tensor
    k_pool: torch.Tensor
    v_pool: torch.Tensor


def chunk_bounds(l: int, chunks: int) -> list[int]:
    """Split [0, l) into `chunks` contiguous ranges of near-equal size (some may be empty)."""
    return [(l * j) // chunks for j in range(chunks + 1)]


class OffloadedCache:
    def __init__(self, plan: Plan, *, num_layers: int, batch: int, max_tokens: int,
                 act_width: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, num_events: int, weights=None,
                 min_context: int | None = None, windows: tuple[int | None, ...] = (),
                 ranks=None):
        """`min_context`: the shortest context a decode step will have (the prompt length;
        the compiled workload's, Plan.prompt_len, by default, as the planner's host check). K,V rows the plan never reads at contexts from there to
        max_tokens are not kept, so a call with a shorter prompt needs a new cache.
        `windows`: per unit, its layer's sliding window (None: attends to every row; empty:
        no unit has one). `ranks`: a kvc.runtime.parallel.Ranks of a token split (issue 18):
        this rank attends to its share of each offloaded unit's cached tokens and merges the
        others' parts (every pool row is kept: each rank holds the whole cache)."""
        self.plan, self.batch, self.max_tokens = plan, batch, max_tokens
        self.weights = weights  # a WeightStreamer when the plan streams any layer's weights
        self.device = torch.device(device)
        self.streams = StreamSet(self.device, num_events)
        self.windows = tuple(windows) if windows else (None,) * num_layers
        if len(self.windows) != num_layers:
            raise ValueError(f"{len(self.windows)} windows for {num_layers} units")
        self.offloaded = list(plan.offloaded_units)
        n_off = len(self.offloaded)
        self.lane = CpuLane(self.device, num_layers, plan.cpu_threads) if plan.cpu_lane else None
        # an auto plan's lane runs only while the steps are faster with it than without
        # (lane_guard: the arm without it runs Plan.bare); a forced fraction, or a plan made
        # before Plan.bare, runs it every step
        guarded = bool(plan.cpu_lane) and plan.cpu_fraction is None and bool(plan.bare)
        self.guard = LaneGuard(StepClock(self.streams.streams.get(COMPUTE))) if guarded else None
        self.split = ranks if ranks is not None and ranks.splits_tokens else None
        # a token split's rank adds the step's own rows only on the last rank (one owner)
        self.owns_new = self.split is None or self.split.rank == self.split.world - 1
        self.min_context = plan.prompt_len if min_context is None else min_context
        # K,V rows below kv_lo are never read back (the plan recomputes them from activations)
        self.kv_lo = max(0, min(max_tokens, plan.min_kv_row(max_tokens, self.min_context)))
        # activations are read back only for recomputed tokens: rows [0, max l)
        full_act = min(max_tokens, plan.max_recompute_tokens(max_tokens))
        # per offloaded unit: the first token its activation and K,V pools keep, the rows
        # each needs, and the most rows its staging slot holds (activations, K,V)
        self.act_base, self.kv_base = {}, {}
        act_need, kv_need, stage_need, act_stage_need = [0], [0], [0], [0]
        # the CPU lane reads the oldest rows and recomputes the next, a token split's shares
        # move with the context: every row is kept
        keep_all = plan.cpu_lane or self.split is not None
        if keep_all:  # (pool row r holds token r: the lane's copies index the pools by token)
            self.kv_lo, full_act = 0, max_tokens
        for i in self.offloaded:
            if self.windows[i] is None or keep_all:
                self.act_base[i], self.kv_base[i] = 0, self.kv_lo
                act_need.append(full_act)
                rows = max_tokens if self.windows[i] is None else min(max_tokens, self.windows[i])
                if self.split is not None:  # a share of them, and the step's own row
                    rows = self.split.share(rows) + 1
                stage_need.append(rows)
                act_stage_need.append(full_act if self.split is None else min(full_act, rows))
            else:
                a_lo, a_hi, k_lo, most_l = self._window_rows(i, max_tokens)
                self.act_base[i], self.kv_base[i] = a_lo, k_lo
                act_need.append(a_hi - a_lo)
                stage_need.append(min(max_tokens, self.windows[i]))
                act_stage_need.append(most_l)
            kv_need.append(max_tokens - self.kv_base[i])
        self.act_rows, kv_rows = max(act_need), max(kv_need)
        kv_shape = (max(stage_need), batch, num_kv_heads, head_dim)  # staging: rows attention reads
        kv_pool_shape = (kv_rows, batch, num_kv_heads, head_dim)
        act_shape = (self.act_rows, batch, act_width)
        shapes = [(n_off, *act_shape), (n_off, *kv_pool_shape), (n_off, *kv_pool_shape)]
        item = torch.empty((), dtype=dtype).element_size()
        # what is pinned: these pools, and the streamed weights' pool already pinned beside them
        check_host_memory(sum(math.prod(sh) for sh in shapes) * item
                          + (weights.nbytes if weights is not None else 0))
        # one allocation per kind: pool[i] is a contiguous block; pinned so copies are DMA
        self.act_pool, self.k_pool, self.v_pool = (pinned_empty(sh, dtype, self.device) for sh in shapes)
        self.pool_index = {layer: j for j, layer in enumerate(self.offloaded)}
        slots = min(plan.staging_slots, n_off)
        self.act_stage = torch.empty((slots, max(act_stage_need), batch, act_width), dtype=dtype,
                                     device=self.device)
        self.k_stage = torch.empty((slots, *kv_shape), dtype=dtype, device=self.device)
        self.v_stage = torch.empty((slots, *kv_shape), dtype=dtype, device=self.device)
        # each offloaded layer's staging slot and pool rows, as views made once: indexing a
        # pool costs the host a few µs per call, and a decode step makes hundreds of calls
        stages, pools = (self.act_stage, self.k_stage, self.v_stage), (self.act_pool, self.k_pool, self.v_pool)
        self.views = {layer: _Views(*(x[self._slot(layer)] for x in stages), *(x[j] for x in pools))
                      for layer, j in self.pool_index.items()}
        resident = [i for i in range(num_layers) if plan.resident[i]]
        self.resident = DeviceCache(resident, batch, max_tokens, num_kv_heads, head_dim, dtype,
                                    self.device, windows=dict(enumerate(self.windows)))
        self.positions = torch.arange(max_tokens, device=self.device)
        self.padding: Padding | None = None  # set per generate call: set_padding
        self.no_mask = torch.empty(0, dtype=torch.bool, device=self.device)
        self.s = 0
        self.bounds: dict[int, list[int]] = {}  # per unit: its recomputed rows' chunks, [0, l)
        self.base: dict[int, int] = {}  # per unit: the token at staging row 0 (lo)
        self.cached: dict[int, int] = {}  # per unit: the cached rows the GPU attends to
        # the CPU attention lane (issue 17): per unit, the first token and count of the cached
        # rows the CPU attends to this step (the oldest c, before the GPU's base)
        self.cpu_rows: dict[int, tuple[int, int]] = {}

    def _window_rows(self, unit: int, max_tokens: int) -> tuple[int, int, int, int]:
        """A windowed unit over the contexts the cache serves: (first and end token of the
        activations it recomputes, first token it reads as K,V, most tokens recomputed)."""
        plan = self.plan
        first, end = self.min_context, max_tokens
        if plan.forced_fraction is None:
            if not plan.recompute:
                return 0, max_tokens, 0, max_tokens  # a hand-made plan without a table: keep all
            lo, hi = plan.context_range  # contexts outside the table are refused
            first, end = max(first, lo), min(end, hi + 1)
        a_lo, a_hi, k_lo, most = max_tokens, 0, max_tokens, 0
        for s in range(first, end):
            lo, l = self._rows(unit, s)
            if l:
                a_lo, a_hi, most = min(a_lo, lo), max(a_hi, lo + l), max(most, l)
            if lo + l < s:
                k_lo = min(k_lo, lo + l)
        return min(a_lo, a_hi), a_hi, k_lo, most

    def _rows(self, unit: int, s: int) -> tuple[int, int]:
        """(lo, l) of a unit at context s: the GPU attends to cached tokens [lo, s) and
        recomputes [lo, lo + l) of them (the CPU lane's rows, if any, come before lo)."""
        lo, c, l = self._split(unit, s)
        return lo + c, l

    def _split(self, unit: int, s: int, lane: bool = True) -> tuple[int, int, int]:
        """(lo, c, l): the unit attends to cached tokens [lo, s) (lo > 0 only with a window),
        the oldest c of them on the CPU, and recomputes the next l.

        A step without the lane (`lane` False: lane_guard's arm without it) runs the plan
        the LP made before it added the lane (Plan.bare): c 0 and that plan's l, shapes the
        recompute's CUDA graphs capture once each (kvc.runtime.segments). Until session 14 the
        arm gave the CPU's tokens back in the lane plan's proportion, rounded down to whole
        chunks: at OPT-6.7B that copied a chunk the plan without the lane recomputes, and the
        arm ran 176 ms a step against that plan's 162 (H200). The staging holds every row with a
        lane (OffloadedCache.__init__: keep_all)."""
        n = self._cached_count(unit, s)
        if self.lane is None:
            return s - n, 0, min(self.plan.recompute_tokens(unit, s), n)
        if not lane:
            return s - n, 0, min(self.plan.bare_tokens(unit, s), n)
        c = self.plan.cpu_tokens(unit, n, s)
        return s - n, c, min(self.plan.recompute_tokens(unit, s), n - c)

    def _cached_count(self, unit: int, s: int) -> int:
        """How many of the s cached tokens the unit attends to, the last n (its layer's
        window holds the new token too: ModelSpec.cached_tokens, per unit)."""
        w = self.windows[unit]
        return s if w is None else max(0, min(s, w - 1))

    def _share(self, unit: int, s: int) -> tuple[int, int, int]:
        """A token split's rank: (base, m, l): of the unit's cached tokens [lo, s) it attends
        to its share [base, base + m) and recomputes the first l (the plan's table is
        indexed by the share: l of m)."""
        n = self._cached_count(unit, s)
        base, end = self.split.bounds(n, self.split.rank)
        m = end - base
        return s - n + base, m, min(self.plan.recompute_tokens(unit, m), m) if m else 0

    def set_padding(self, pads: torch.Tensor | None) -> None:
        """The call's left padding, per row of the whole batch (all micro-batches, in order),
        or None: no row is padded (positions are shared, kv_mask is empty)."""
        if pads is not None and len(pads) != self.batch * self.plan.micro_batches:
            raise ValueError(f"{len(pads)} padding counts for {self.batch * self.plan.micro_batches} rows")
        self.padding = None if pads is None else Padding(pads, self.max_tokens, self.device)
        self.resident.padding = self.padding

    def step_positions(self, s: int, t: int) -> torch.Tensor:
        """Positions of the step's tokens [s, s+t): [t], or [b, t] per row when padded."""
        if self.padding is None:
            return self.positions[s:s + t]
        return self.padding.positions[:, s:s + t]

    def _batch_rows(self, unit: int) -> slice:
        """The rows of the whole batch that unit `unit` computes (its micro-batch)."""
        k = unit % self.plan.micro_batches
        return slice(k * self.batch, (k + 1) * self.batch)

    def kv_mask(self, layer: int):
        """The padding mask for the rows this unit attends to (empty: no padding): prefill's
        own tokens, a resident unit's kv_read, an offloaded unit's staged_kv."""
        if self.padding is None:
            return self.no_mask
        rows = self._batch_rows(layer)
        if self.plan.resident[layer]:
            return self.resident.kv_mask(layer, rows)
        lo = 0 if self.s == 0 else self.base[layer]
        mask = self.padding.mask(rows, lo, self.s, self.t, self.windows[layer])
        if self.s and not self.owns_new:  # a token split's share ends before the step's rows
            return mask[..., :self.cached[layer]]
        return mask

    @property
    def host_bytes(self) -> int:
        """Bytes of the CPU pools (what cost.host_pool_bytes predicts)."""
        return sum(p.nbytes for p in (self.act_pool, self.k_pool, self.v_pool))

    def finish(self) -> None:
        """The end of a generate call: raise a failure of the work the host did not wait for
        (the CPU lane's partials)."""
        if self.lane is not None:
            self.lane.finish()

    def close(self) -> None:
        """Wait for the copies still reading or writing the pools, so they can be freed."""
        if self.lane is not None:
            self.lane.close()
        self.streams.synchronize()

    # --- step bookkeeping (host side only: no device work, no sync) ----------------------
    def begin_step(self, s: int, t: int = 1) -> None:
        self.s, self.t = s, t
        self.resident.s = s
        if s == 0:
            self.bounds = {}
            if self.lane is not None:  # the prefill rewrites the pools the lane copies from
                self.lane.restart()
            if self.guard is not None:
                self.guard.restart()
            return
        chunks = self.plan.act_chunks
        lane = True
        if self.guard is not None:
            if t != 1:  # not a decode step: the time up to it is no decode step's
                self.guard.restart()
            # a step without the lane runs the plan without it (Plan.bare, _split)
            lane = self.guard.step() if t == 1 else self.guard.on
        for i in self.offloaded:
            if self.split is not None:
                base, m, l = self._share(i, s)
                self.cpu_rows[i] = (base, 0)
                self.base[i], self.cached[i] = base, m
            else:
                lo, c, l = self._split(i, s, lane)
                self.cpu_rows[i] = (lo, c)
                self.base[i], self.cached[i] = lo + c, s - lo - c
            self.bounds[i] = chunk_bounds(l, chunks)
        # the pools were sized so that contexts from min_context on never read outside them:
        # only a shorter context needs the check, so a decode step pays nothing for it
        if s < self.min_context:
            for i in self.offloaded:
                lo, l = self.base[i], self.bounds[i][-1]
                if lo + l < s and lo + l < self.kv_base[i]:
                    raise KvcError(
                        f"context {s} reads K,V from token {lo + l}, but the CPU pools keep tokens "
                        f"{self.kv_base[i]}.. only (made for contexts >= {self.min_context})")
                a = self.act_base[i]
                if l and not (a <= lo and lo + l <= a + self.act_rows):
                    raise KvcError(
                        f"context {s} recomputes tokens {lo}..{lo + l - 1}, but the CPU pools keep "
                        f"activations of tokens {a}..{a + self.act_rows - 1} only (made for "
                        f"contexts >= {self.min_context})")

    def end_step(self, tokens: int) -> None:
        self.s += tokens
        self.resident.advance(0)

    def _slot(self, layer: int) -> int:
        return self.pool_index[layer] % self.plan.staging_slots

    # --- the CPU attention lane (kvc.runtime.cpu_attention) ------------------------------
    def cpu_attn_begin(self, q, layer: int, scale: float, softcap: float) -> int:
        """Hand the step's query [b, H, 1, hd] to the CPU for the unit's oldest cached rows;
        the unit, for `merge_parts` (kvc.models.attend), or -1: all of the unit's attention
        is in what staged_kv returns. A token split's offloaded unit always has parts: the
        other ranks' shares."""
        if self.s == 0 or self.plan.resident[layer]:
            return -1
        if self.lane is None:
            return layer if self.split is not None else -1
        lo, c = self.cpu_rows[layer]
        if not c:
            return -1
        w = self.views[layer]
        real = None
        if self.padding is not None:
            real = self.padding.real_host[self._batch_rows(layer), lo:lo + c]
        self.lane.begin(layer, q[:, :, 0], w.k_pool, w.v_pool, lo, c, scale, softcap, real,
                        written=self.streams.streams.get(OFFLOAD))
        return layer

    def merge_parts(self, layer: int, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """This step's attention of the unit from the part the GPU computed here (out [b, H,
        hd], lse [b, H], float32) and the parts elsewhere: the CPU lane's, then the other
        ranks' shares (one all-gather), merged exactly (kvc.models.attend)."""
        part = self.lane.end(layer) if self.lane is not None else None
        if part is not None:
            out_c, lse_c = part
            out, lse = merge(out, lse, out_c, lse_c), torch.logaddexp(lse, lse_c)
        if self.split is not None:
            out = self.split.merge(out, lse)
        return out

    # --- resident layers: the logical cache verbs ----------------------------------------
    def kv_read(self, layer: int):
        return self.resident.kv_read(layer)

    def kv_write(self, k, v, layer: int) -> None:
        self.resident.kv_write(k, v, layer)

    # --- offload: new tokens to the CPU pools -------------------------------------------
    def _to_pool(self, pool: torch.Tensor, x: torch.Tensor, stream: int, lo: int = 0) -> None:
        """Write x's tokens (rows [s, s+t)) into `pool`, which keeps rows [lo, lo + len(pool)):
        the others are never read back."""
        a, b = max(self.s, lo), min(self.s + x.shape[1], lo + pool.shape[0])
        if b <= a:
            return
        with self.streams.use(stream):
            self.streams.keep_alive(x, stream)
            pool[a - lo:b - lo].copy_(x[:, a - self.s:b - self.s].transpose(0, 1), non_blocking=True)

    def offload_act(self, h, stream: int, layer: int) -> None:
        self._to_pool(self.views[layer].act_pool, h, stream, self.act_base[layer])

    def offload_kv(self, k, v, stream: int, layer: int) -> None:
        w, lo = self.views[layer], self.kv_base[layer]
        self._to_pool(w.k_pool, k, stream, lo)
        self._to_pool(w.v_pool, v, stream, lo)
        if self.lane is not None and self.s == 0:  # the first step's CPU rows, behind the prefill
            first, c, _ = self._split(layer, self.t)
            self.lane.prepare(layer, w.k_pool, w.v_pool, first + c, self.streams.streams.get(stream))

    # --- prefetch: CPU pools -> staging --------------------------------------------------
    def prefetch_act(self, stream: int, layer: int, chunk: int) -> None:
        lo, hi = self.bounds[layer][chunk], self.bounds[layer][chunk + 1]
        if hi > lo:
            a = self.base[layer] - self.act_base[layer]  # pool row of the token at staging row 0
            with self.streams.use(stream):
                w = self.views[layer]
                w.act_stage[lo:hi].copy_(w.act_pool[a + lo:a + hi], non_blocking=True)

    def prefetch_kv(self, stream: int, layer: int) -> None:
        l, n = self.bounds[layer][-1], self.cached[layer]
        if n > l:
            w = self.views[layer]
            a = self.base[layer] - self.kv_base[layer]  # pool row r holds token kv_base + r
            with self.streams.use(stream):
                w.k_stage[l:n].copy_(w.k_pool[a + l:a + n], non_blocking=True)
                w.v_stage[l:n].copy_(w.v_pool[a + l:a + n], non_blocking=True)

    def staged_act(self, layer: int, chunk: int):
        lo, hi = self.bounds[layer][chunk], self.bounds[layer][chunk + 1]
        return self.views[layer].act_stage[lo:hi].transpose(0, 1)

    def put_recomputed(self, k, v, layer: int, chunk: int) -> None:
        lo, hi, w = self.bounds[layer][chunk], self.bounds[layer][chunk + 1], self.views[layer]
        w.k_stage[lo:hi].copy_(k.transpose(0, 1))
        w.v_stage[lo:hi].copy_(v.transpose(0, 1))

    def put_new(self, k, v, layer: int) -> None:
        n, t, w = self.cached[layer], k.shape[1], self.views[layer]
        w.k_stage[n:n + t].copy_(k.transpose(0, 1))
        w.v_stage[n:n + t].copy_(v.transpose(0, 1))

    def staged_kv(self, layer: int):
        n, w = self.cached[layer] + (self.t if self.owns_new else 0), self.views[layer]
        return w.k_stage[:n].transpose(0, 1), w.v_stage[:n].transpose(0, 1)

    def recompute_positions(self, layer: int, chunk: int):
        lo = self.base[layer]
        a, b = lo + self.bounds[layer][chunk], lo + self.bounds[layer][chunk + 1]
        if self.padding is None:
            return self.positions[a:b]
        return self.padding.positions[self._batch_rows(layer), a:b]  # the unit's rows

    # --- weights: a streamed layer's CPU pool -> its GPU weight slot ---------------------
    def prefetch_weights(self, stream: int, layer: int) -> None:
        self.weights.prefetch(self.streams, stream, layer)

    # --- events --------------------------------------------------------------------------
    def record_event(self, stream: int, event: int) -> None:
        self.streams.record(stream, event)

    def wait_event(self, stream: int, event: int) -> None:
        self.streams.wait(stream, event)
