"""The lanes of one decode step: ONE earliest-start walk over its units, run by three backends.

A unit is a layer on one micro-batch (units are layers when there is one micro-batch). The
runtime issues a step on three lanes: one H2D copy stream (per unit: a streamed layer's
weights on its first unit, then the activation chunks, then the K,V tail), the compute stream
(the new token's front, recompute chunk k once chunk k has landed and chunk k-1 is done, then
the rest of the layer once its K,V tail has landed) and a D2H stream for the write-back.
A fourth lane (issue 17), the CPU's: a unit with CPU tokens attends to them on the host's
worker threads, from when its query exists (its `front` is done) for `P` ms; the layer's
attention merges that partial before the rest of the layer (`back`) runs, so the unit's
compute waits max(its GPU attention, its CPU part). One unit's CPU part ends before the next
unit's query exists (the next unit starts after this one ends), so the CPU lane never queues.
A token split over several GPUs (Plan.split "tokens"): an offloaded unit's attention covers
its rank's share of the context, and the ranks' partials are all-gathered and merged on the
compute stream (`merge` ms) before the rest of the layer (`back`); its staging slot is free
once its attention has read it, before the merge.

`walk` states that schedule once. Every `max(a, b, ...)` in it goes through the backend:
- `ArrayOps`: numpy arrays of any trailing (context) shape, `np.maximum`: `simulate`;
- `IntervalOps`: floats for one context, recording each lane's busy intervals: `intervals`;
- `LpOps`: pulp expressions; each max becomes a new variable v with v >= a, v >= b, ...
  (sums of expressions and constants stay affine), so minimising the step is the LP
  (kvc.planner.lp). For fixed durations the LP's optimum is exactly the walk's value.

Structure is per unit and never depends on a duration's value: `offloaded[u]` (its cache
lives in CPU memory) and `streams[u]` (the first unit of a layer whose weights stream). Only
a unit with copies (offloaded or streaming) waits for them; a resident unit waits for no
other unit's copies. Its (empty) copies still take their place on the copy stream, after the
previous ones and once its staging slot is free.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass
class Step:
    """One decode step: per-unit durations (ms; anything the backend adds and compares) and
    structure. A, K, R, C, D, W: activation copy, K,V copy, recompute, the unit's own compute,
    write-back, weight copy; P: the CPU lane's attention (issue 17), for the units `cpu` marks. `weight_lag`: the weight copy waits for the unit that many before
    (micro_batches + 1: the last unit of the layer two back, which used the same one of the
    two weight slots). `lookahead`: the copies of unit u go into staging slot u mod
    (lookahead + 1), free once unit u-1-lookahead's attention has read it, `back` ms before it
    ends. `front` ms of each unit's compute read nothing staged and run first in the layer."""
    A: Sequence[Any]
    K: Sequence[Any]
    R: Sequence[Any]
    C: Sequence[Any]
    D: Sequence[Any]
    W: Sequence[Any]
    head: Any
    offloaded: Sequence[bool]
    streams: Sequence[bool]
    lookahead: int
    act_chunks: int
    weight_lag: int = 2
    back: Any = 0.0
    front: Any = 0.0
    P: Sequence[Any] = ()  # per unit, the CPU lane's part (only where `cpu` marks the unit)
    cpu: Sequence[bool] = ()  # per unit: it attends to some tokens on the CPU (empty: none)
    # per unit, a token split's all-gather and merge after its attention (a float; 0 or
    # empty: none)
    merge: Sequence[float] = ()

    @property
    def units(self) -> int:
        return len(self.offloaded)


def walk(ops, st: Step):
    """The step's earliest-start schedule; returns when it ends (the backend's value)."""
    c = st.act_chunks
    ends: list = []  # compute end per unit
    freed: list = []  # per unit: when its attention has read its staging slot (None: end - back)
    copy_end = d2h_end = ops.zero
    for u in range(st.units):
        A, K, R, C = st.A[u], st.K[u], st.R[u], st.C[u]
        t = ends[u - 1] if u else ops.zero  # the compute stream is free
        if st.streams[u]:  # the weights: after the copies before them, once their slot is free
            jw = u - st.weight_lag
            w0 = ops.max(copy_end, ends[jw]) if jw >= 0 else copy_end
            copy_end = w0 + st.W[u]
            ops.record("copy-in", u, "weight_copy", w0, copy_end)
            t = ops.max(t, copy_end)  # nothing of the layer runs before its weights
        j = u - 1 - st.lookahead
        if j >= 0:  # staging slot free
            start = ops.max(copy_end, ends[j] - st.back if freed[j] is None else freed[j])
        else:
            start = copy_end
        t0, t = t, t + st.front
        ops.record("compute", u, "compute", t0, t)
        lane = bool(st.cpu) and st.cpu[u]
        if lane:  # the query exists: the CPU attends to its tokens beside everything else
            cpu_end = t + st.P[u]
            ops.record("cpu", u, "cpu_attn", t, cpu_end)
        waits = st.offloaded[u] or st.streams[u]  # a unit with copies waits for them
        landed = start
        for k in range(1, c + 1):
            was, landed = landed, start + (k / c) * A
            ops.record("copy-in", u, "act_copy", was, landed)
            t0 = ops.max(t, landed) if waits else t
            t = t0 + (1.0 / c) * R
            ops.record("compute", u, "recompute", t0, t)
        copy_end = landed + K  # landed: start + A
        ops.record("copy-in", u, "kv_copy", landed, copy_end)
        begin = ops.max(t, copy_end) if waits else t
        M = st.merge[u] if st.merge else 0.0
        freed.append(None)
        if lane:  # the GPU's attention, then the merge waits for the CPU's partial
            attn = begin + C - st.front - st.back
            ops.record("compute", u, "compute", begin, attn)
            merged = ops.max(attn, cpu_end)
            if M:  # a token split: the ranks' partials too
                freed[-1] = merged
                ops.record("compute", u, "merge", merged, merged + M)
                merged = merged + M
            ends.append(merged + st.back)
            ops.record("compute", u, "compute", merged, ends[-1])
        elif M:  # a token split: attention over the share, the ranks' merge, the rest
            attn = begin + C - st.front - st.back
            ops.record("compute", u, "compute", begin, attn)
            freed[-1] = attn
            merged = attn + M
            ops.record("compute", u, "merge", attn, merged)
            ends.append(merged + st.back)
            ops.record("compute", u, "compute", merged, ends[-1])
        else:
            ends.append(begin + C - st.front)
            ops.record("compute", u, "compute", begin, ends[-1])
        wb = ops.max(d2h_end, ends[-1])
        d2h_end = wb + st.D[u]
        ops.record("copy-out", u, "writeback", wb, d2h_end)
    last = ends[-1] if ends else ops.zero
    done = last + st.head
    ops.record("compute", None, "head", last, done)
    return ops.max(done, d2h_end)


# --- backends ----------------------------------------------------------------------------------

class ArrayOps:
    """numpy arrays of one trailing shape (e.g. contexts); no recording."""

    def __init__(self, shape=()):
        self.zero = np.zeros(shape)

    def max(self, *xs):
        return functools.reduce(np.maximum, xs)

    def record(self, lane, unit, kind, start, end):
        pass


class IntervalOps:
    """Floats for one context; records every lane's busy intervals (zero-length work left out)."""

    zero = 0.0

    def __init__(self):
        self.items: list[dict] = []

    def max(self, *xs):
        return max(float(x) for x in xs)

    def record(self, lane, unit, kind, start, end):
        if end > start:
            self.items.append({"lane": lane, "layer": unit, "kind": kind, "start": float(start),
                               "end": float(end)})


class LpOps:
    """pulp: each max of expressions becomes a variable bounded below by every argument."""

    zero = 0.0

    def __init__(self, prob, prefix: str = "t"):
        self.prob, self.prefix, self.count = prob, prefix, 0

    def max(self, *xs):
        if len(xs) == 1:
            return xs[0]
        if all(isinstance(x, (int, float)) for x in xs):
            return max(xs)
        v = self.prob.add_variable(f"{self.prefix}{self.count}")  # pulp 3.3+: the problem's own
        self.count += 1
        for x in xs:
            self.prob += v >= x
        return v

    def record(self, lane, unit, kind, start, end):
        pass


# --- the numpy and interval schedules -------------------------------------------------------------

def _structure(A, K, W, offloaded, streams):
    """Per-unit structure: given, or read off the durations (copies that exist; weights that
    stream)."""
    axes = tuple(range(1, np.ndim(A)))
    if offloaded is None:
        offloaded = np.any((np.asarray(A) + np.asarray(K)) > 0, axis=axes) if axes else \
            (np.asarray(A) + np.asarray(K)) > 0
    if streams is None:
        streams = np.any(np.asarray(W) > 0, axis=axes) if axes else np.asarray(W) > 0
    return [bool(x) for x in np.reshape(offloaded, -1)], [bool(x) for x in np.reshape(streams, -1)]


def _cpu_structure(P, A, cpu):
    """(P as an array shaped like A, per-unit flags): given, or read off P (units with a CPU
    part at some context)."""
    if P is None:
        return None, []
    P = np.broadcast_to(np.asarray(P, dtype=float), np.shape(A))
    if cpu is None:
        axes = tuple(range(1, P.ndim))
        cpu = np.any(P > 0, axis=axes) if axes else P > 0
    return P, [bool(x) for x in np.reshape(cpu, -1)]


def simulate(A, K, R, C, D, head: float, lookahead: int, act_chunks: int, W=None,
             weight_lag: int = 2, back: float = 0.0, front: float = 0.0, offloaded=None,
             streams=None, P=None, cpu=None, merge=()):
    """The walk on numpy arrays [units, ...] (any trailing shape, e.g. contexts): the step's
    earliest-start schedule for fixed durations, the LP's evaluator. `W` (optional): a
    weight-streamed layer's weight copy on its first unit. `offloaded` / `streams` (per unit;
    default: units with activation or K,V copies / a weight copy). `P` (optional): the CPU
    lane's part per unit, `cpu` its units (default: those with P > 0 somewhere). `merge`
    (optional): per unit, a token split's all-gather and merge (ms; counted as GPU busy).
    Returns (step, link_busy, gpu_busy) in ms."""
    A, K, R, C, D = (np.asarray(x, dtype=float) for x in (A, K, R, C, D))
    W = np.zeros_like(A) if W is None else np.broadcast_to(np.asarray(W, dtype=float), A.shape)
    off, st = _structure(A, K, W, offloaded, streams)
    P, lane = _cpu_structure(P, A, cpu)
    merge = [float(x) for x in merge]
    step = walk(ArrayOps(A.shape[1:]), Step(A, K, R, C, D, W, head, off, st, lookahead,
                                            act_chunks, weight_lag, back, front,
                                            () if P is None else P, lane, merge))
    link = (W + A + K).sum(axis=0)
    gpu = (R + C).sum(axis=0) + head
    if any(merge):
        gpu = gpu + sum(merge)
    return step, link, gpu


def intervals(A, K, R, C, D, head: float, lookahead: int, act_chunks: int, W=None,
              weight_lag: int = 2, back: float = 0.0, front: float = 0.0, offloaded=None,
              streams=None, P=None, cpu=None, merge=()) -> list[dict]:
    """The same walk as `simulate`, for one context (arrays [units]), as the intervals each
    lane is busy: dicts with lane (copy-in | compute | copy-out | cpu), layer (the unit; None
    for the head), kind (weight_copy | act_copy | kv_copy | recompute | compute | writeback |
    cpu_attn | merge | head), start and end in ms. Zero-length work is left out."""
    A, K, R, C, D = (np.asarray(x, dtype=float).reshape(-1) for x in (A, K, R, C, D))
    W = np.zeros_like(A) if W is None else np.asarray(W, dtype=float).reshape(-1)
    off, st = _structure(A, K, W, offloaded, streams)
    P, lane = _cpu_structure(None if P is None else np.asarray(P, dtype=float).reshape(-1), A, cpu)
    ops = IntervalOps()
    walk(ops, Step(*(x.tolist() for x in (A, K, R, C, D, W)), float(head), off, st, lookahead,
                   act_chunks, weight_lag, float(back), float(front),
                   () if P is None else P.tolist(), lane, [float(x) for x in merge]))
    return ops.items
