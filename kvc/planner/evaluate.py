"""A plan's predicted decode steps: its durations (cost.durations, fixed costs only where
paid) walked on numpy arrays (lanes.simulate) over any set of contexts, and the host's time to
issue the step's nodes, which the GPU cannot finish before."""
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
    return {"predicted_step_ms": step, "link_busy_ms": link, "gpu_busy_ms": gpu, "host_ms": host,
            "gpu_idle_ms": max(0.0, step - gpu), "link_idle_ms": max(0.0, step - link),
            "h2d_bytes": int(moved[0])}


def evaluate(spec, hw, plan: Plan, ctx: np.ndarray, b: int, dtype: str):
    """(step, link busy, GPU busy, H2D bytes) per context of `ctx` and the host time, with the
    plan's own l at each context."""
    l = np.array(plan.recompute_table(np.reshape(ctx, -1)), dtype=np.int64).reshape(
        (plan.num_units,) + np.shape(ctx))
    step, link, gpu, host = evaluate_arrays(spec, hw, plan, ctx, l, b, dtype)
    weights = sum(plan.weights_streamed) * cost.layer_weight_bytes(spec, cost.dtype_bytes(dtype))
    return step, link, gpu, host, copy_bytes(spec, plan, ctx, l, b, dtype).sum(axis=0) + weights


def copy_bytes(spec, plan: Plan, ctx, l, b: int, dtype: str) -> np.ndarray:
    """[units, contexts]: the bytes each unit copies to the GPU at each context (activations
    of its l recomputed tokens and K,V of the rest of the tokens it reads), weights aside."""
    p, bm = cost.dtype_bytes(dtype), b // plan.micro_batches
    n = unit_contexts(spec, plan, ctx)
    l = np.minimum(l, n)
    off = ~np.array(plan.resident).reshape((-1,) + (1,) * np.ndim(ctx))
    return (cost.act_bytes(spec, bm, l, p) + cost.kv_bytes(spec, bm, n - l, p)) * off


def unit_contexts(spec, plan: Plan, s) -> np.ndarray:
    """[units, *shape(s)]: the cached tokens each unit's layer reads at context s."""
    return cost.per_unit(cost.layer_contexts(spec, s), plan.micro_batches)


def step_terms(spec, hw, plan: Plan, s, l, b: int, dtype: str):
    """What cost.simulate and cost.intervals take for this plan at a context s (or a 1-D array
    of them) with per-unit l ([units] or [units, contexts]; l beyond what a sliding-window
    layer reads is capped, as the runtime does): (A, K, R, C, D, head, lookahead,
    act_chunks) and the keywords (weights, front and back, which units are offloaded). One
    place, so the prediction and the timeline picture never describe different schedules."""
    streamed, m = plan.weights_streamed, plan.micro_batches
    c = cost.layer_costs(spec, hw, b // m, dtype, offloaded=plan.offloaded or any(streamed))
    trailing = np.shape(s)
    res = np.array(plan.resident).reshape((-1,) + (1,) * len(trailing))
    n = unit_contexts(spec, plan, s)  # each layer at its own context (its window)
    A, K, R, C, D = cost.durations(c, n, np.minimum(l, n), res, plan.act_chunks)
    W = cost.weight_durations(c, streamed, trailing, m) if any(streamed) else None
    return ((A, K, R, C, D, m * c.head, plan.lookahead, plan.act_chunks),
            {"W": W, "weight_lag": m + 1, "back": c.layer_back, "front": c.layer_front,
             "offloaded": [not r for r in plan.resident]})


def evaluate_arrays(spec, hw, plan: Plan, ctx, l, b, dtype):
    """(step, link busy, GPU busy) per context and the host's time to issue a step, for
    per-unit l ([units, contexts])."""
    args, kw = step_terms(spec, hw, plan, ctx, l, b, dtype)
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
