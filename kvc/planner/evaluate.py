"""A plan's predicted decode steps: its durations (cost.durations, fixed costs only where
paid) walked on numpy arrays (lanes.simulate) over any set of contexts, and the host's time to
issue the step's nodes, which the GPU cannot finish before.

The CPU attention lane (issue 17): a unit's c CPU tokens (Plan.cpu_tokens) are the oldest of
the n it reads, its l recomputed tokens the next ones (capped at n - c, as the runtime
does), its K,V copies the rest."""
from __future__ import annotations

import numpy as np

from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.ir.plan import Plan
from kvc.models.spec import ModelSpec
from kvc.planner import cost


def predict(spec: ModelSpec, hw: HardwareConfig, plan: Plan, s: int, batch_size: int,
            dtype: str) -> dict:
    """Predicted decode step at context s: total and the busy time of the link and the GPU."""
    if plan.batch_size and (plan.batch_size, plan.dtype) != (batch_size, dtype):
        raise KvcError(f"the plan was made for batch {plan.batch_size} {plan.dtype}, "
                       f"not batch {batch_size} {dtype}; make a plan for this workload")
    step, link, gpu, host, moved = evaluate(spec, hw, plan, np.array([s]), batch_size, dtype)
    step, link, gpu = float(step[0]), float(link[0]), float(gpu[0])
    out = {"predicted_step_ms": step, "link_busy_ms": link, "gpu_busy_ms": gpu, "host_ms": host,
           "gpu_idle_ms": max(0.0, step - gpu), "link_idle_ms": max(0.0, step - link),
           "h2d_bytes": int(moved[0])}
    if plan.cpu_lane:  # plans without the lane report what they always did
        cpu = cpu_table(spec, plan, np.array([s]))[:, 0]
        kw = step_terms(spec, hw, plan, s, np.zeros(plan.num_units), batch_size, dtype, cpu)[1]
        out["cpu_busy_ms"] = float(np.sum(kw.get("P", 0.0)))
    return out


def evaluate(spec, hw, plan: Plan, ctx: np.ndarray, b: int, dtype: str):
    """(step, link busy, GPU busy, H2D bytes) per context of `ctx` and the host time, with the
    plan's own l (and CPU tokens) at each context."""
    l = np.array(plan.recompute_table(np.reshape(ctx, -1)), dtype=np.int64).reshape(
        (plan.num_units,) + np.shape(ctx))
    cpu = cpu_table(spec, plan, ctx) if plan.cpu_lane else None
    step, link, gpu, host = evaluate_arrays(spec, hw, plan, ctx, l, b, dtype, cpu)
    weights = sum(plan.weights_streamed) * cost.layer_weight_bytes(spec, cost.dtype_bytes(dtype))
    return step, link, gpu, host, copy_bytes(spec, plan, ctx, l, b, dtype, cpu).sum(axis=0) + weights


def cpu_table(spec, plan: Plan, ctx) -> np.ndarray:
    """[units, *shape(ctx)]: c, the tokens each unit attends to on the CPU at each context
    (Plan.cpu_tokens over arrays; 0 without the lane)."""
    n = unit_contexts(spec, plan, ctx)
    off = ~np.array(plan.resident).reshape((-1,) + (1,) * np.ndim(ctx))
    if plan.cpu_fraction is not None:
        c = np.rint(plan.cpu_fraction * n).astype(np.int64)  # round half to even, as round()
    elif plan.cpu:
        s = np.asarray(ctx, dtype=np.int64)
        rows = np.array(plan.cpu, dtype=np.int64)  # [runs, units]
        starts = plan.recompute_from or (plan.prompt_len,)
        k = np.searchsorted(np.asarray(starts), s, side="right") - 1 if plan.recompute_from \
            else s - plan.prompt_len
        c = np.moveaxis(rows[np.clip(k, 0, len(rows) - 1)], -1, 0)
    else:
        return np.zeros(n.shape, dtype=np.int64)
    return np.clip(c, 0, n) * off


def copy_bytes(spec, plan: Plan, ctx, l, b: int, dtype: str, cpu=None) -> np.ndarray:
    """[units, contexts]: the bytes each unit copies to the GPU at each context (activations
    of its l recomputed tokens and K,V of the rest of the tokens it reads but the `cpu` ones
    the CPU attends to), weights aside."""
    p, bm = cost.dtype_bytes(dtype), b // plan.micro_batches
    n = unit_contexts(spec, plan, ctx)
    c = np.zeros_like(n) if cpu is None else np.minimum(cpu, n)
    l = np.minimum(l, n - c)
    off = ~np.array(plan.resident).reshape((-1,) + (1,) * np.ndim(ctx))
    return (cost.act_bytes(spec, bm, l, p) + cost.kv_bytes(spec, bm, n - c - l, p)) * off


def unit_contexts(spec, plan: Plan, s) -> np.ndarray:
    """[units, *shape(s)]: the cached tokens each unit's layer reads at context s."""
    return cost.per_unit(cost.layer_contexts(spec, s), plan.micro_batches)


def step_terms(spec, hw, plan: Plan, s, l, b: int, dtype: str, cpu=None):
    """What cost.simulate and cost.intervals take for this plan at a context s (or a 1-D array
    of them) with per-unit l ([units] or [units, contexts]; l beyond what a sliding-window
    layer reads is capped, as the runtime does) and CPU tokens `cpu` (same shape; None: none;
    l is capped at n - cpu): (A, K, R, C, D, head, lookahead, act_chunks) and the keywords
    (weights, front and back, which units are offloaded, the CPU lane's part P). One place,
    so the prediction and the timeline picture never describe different schedules."""
    streamed, m = plan.weights_streamed, plan.micro_batches
    c = cost.layer_costs(spec, hw, b // m, dtype, offloaded=plan.offloaded or any(streamed))
    trailing = np.shape(s)
    res = np.array(plan.resident).reshape((-1,) + (1,) * len(trailing))
    n = unit_contexts(spec, plan, s)  # each layer at its own context (its window)
    kw = {}
    if cpu is not None and np.any(cpu):
        cpu = np.where(res, 0, np.minimum(cpu, n))
        A, K, R, C, D = cost.durations(c, n, np.minimum(l, n - cpu), res, plan.act_chunks, cpu)
        kw = {"P": cost.cpu_durations(c, cpu)}
    else:
        A, K, R, C, D = cost.durations(c, n, np.minimum(l, n), res, plan.act_chunks)
    W = cost.weight_durations(c, streamed, trailing, m) if any(streamed) else None
    return ((A, K, R, C, D, m * c.head, plan.lookahead, plan.act_chunks),
            {"W": W, "weight_lag": m + 1, "back": c.layer_back, "front": c.layer_front,
             "offloaded": [not r for r in plan.resident], **kw})


def evaluate_arrays(spec, hw, plan: Plan, ctx, l, b, dtype, cpu=None):
    """(step, link busy, GPU busy) per context and the host's time to issue a step, for
    per-unit l and CPU tokens ([units, contexts])."""
    args, kw = step_terms(spec, hw, plan, ctx, l, b, dtype, cpu)
    step, link, gpu = cost.simulate(*args, **kw)
    # the host issues the step's nodes one by one; the GPU cannot finish before the last one
    host = host_ms(spec, hw, plan, l)
    return np.maximum(step, host), link, gpu, host


def host_ms(spec, hw, plan: Plan, l) -> float:
    """Host time to issue one decode step. A unit that recomputes at any context carries its
    clone nodes at every context."""
    ever = (np.asarray(l) > 0).any(axis=-1) if np.ndim(l) > 1 else np.asarray(l) > 0
    graphed = plan.cuda_graphs and hw.device == "cuda"  # CompiledModel's rule
    return cost.host_ms(hw, cost.host_node_kinds(spec, plan.resident, ever, plan.act_chunks,
                                                 plan.weights_streamed, plan.micro_batches,
                                                 graphed), spec)
