"""A plan's predicted decode steps: its durations (cost.durations, fixed costs only where
paid) walked on numpy arrays (lanes.simulate) over any set of contexts, and the host's time to
issue the step's nodes, which the GPU cannot finish before.

The CPU attention lane (issue 17): a unit's c CPU tokens (Plan.cpu_tokens) are the oldest of
the n it reads, its l recomputed tokens the next ones (capped at n - c, as the runtime
does), its K,V copies the rest.

Several GPUs (issue 18): a Plan with world_size N > 1 is one rank's, for its batch_size rows.
`predict` takes the host's HardwareConfig and either the rank's batch or the whole batch
(`rank_view`); `evaluate`, `evaluate_arrays` and `step_terms` take the rank's machine and
batch. The logits all-gather after each step (`gather_ms`) is added to the step in one place,
`evaluate_arrays`, so the plan's predictions, `predict` and the reports agree.

A token split (Plan.split "tokens"): every rank decodes the whole batch; the plan's table,
contexts and predictions are a rank's share of the context (Plan.share_context), its
offloaded units pay the all-gather and merge of the ranks' partials inside the walk
(cost.merge_ms, lanes.walk's `merge`), and the step a token broadcast (`gather_ms`:
collective_us once). `predict` and the timeline take the whole context."""
from __future__ import annotations

import numpy as np

from kvc.errors import KvcError
from kvc.hardware import HardwareConfig, per_rank
from kvc.ir.plan import Plan
from kvc.models.spec import ModelSpec
from kvc.planner import cost


def predict(spec: ModelSpec, hw: HardwareConfig, plan: Plan, s: int, batch_size: int,
            dtype: str) -> dict:
    """Predicted decode step at context s: total and the busy time of the link and the GPU
    (of one rank, on several GPUs: `hw` is the host's, `batch_size` the rank's or the whole
    batch, see rank_view; the step then includes the logits all-gather, `gather_ms`). A token
    split: s is the whole context, the step the rank's at its share (`share_context`), with
    the merges (`merge_ms` per offloaded unit) and the token broadcast (`gather_ms`)."""
    hw, batch_size = rank_view(hw, plan, batch_size)
    whole, s = s, plan.share_context(s)
    if plan.batch_size and (plan.batch_size, plan.dtype) != (batch_size, dtype):
        ranks = f" per rank of {plan.world_size}" if plan.world_size > 1 else ""
        raise KvcError(f"the plan was made for batch {plan.batch_size}{ranks} {plan.dtype}, "
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
    if plan.world_size > 1:  # one-GPU plans report what they always did
        out["gather_ms"] = gather_ms(spec, hw, plan.world_size, batch_size, dtype, plan.split)
    if plan.context_shares > 1:
        merge = cost.merge_ms(spec, hw, plan.world_size, batch_size // plan.micro_batches,
                              hw.compute_slowdown)
        out.update(share_context=s, whole_context=whole, merge_ms=merge,
                   merges_ms=merge * len(plan.offloaded_units))
    return out


def rank_view(hw: HardwareConfig, plan: Plan, batch_size: int) -> tuple[HardwareConfig, int]:
    """(machine, batch) of one rank of `plan`: the host's machine as a rank sees it
    (kvc.hardware.per_rank; its rates are idempotent, so a rank's machine passes unchanged
    where rates are concerned) and the rank's rows, ceil(batch_size / world_size), where
    `batch_size` is a whole batch the plan's rank batch came from (the plan's own batch
    passes as it is). world_size 1: both as given. A token split: every rank has the whole
    batch."""
    n = plan.world_size
    if n == 1:
        return hw, batch_size
    if plan.context_shares > 1:
        return per_rank(hw, n), batch_size
    if batch_size != plan.batch_size and (not plan.batch_size or -(-batch_size // n) == plan.batch_size):
        batch_size = -(-batch_size // n)
    return per_rank(hw, n), batch_size


def gather_ms(spec: ModelSpec, hw: HardwareConfig, world_size: int, rank_batch: int,
              dtype: str, split: str = "rows") -> float:
    """The logits all-gather after each step among `world_size` ranks (0 for one): each rank
    receives the other ranks' last-position logits, (N - 1) x rank_batch x vocab_size values
    in the model dtype, at hw.collective_gbps after hw.collective_us. A token split (every
    rank has every row's logits): the step's token broadcast instead, collective_us once."""
    if world_size <= 1:
        return 0.0
    if split == "tokens":
        return hw.collective_us * 1e-3
    nbytes = (world_size - 1) * rank_batch * spec.vocab_size * cost.dtype_bytes(dtype)
    return hw.collective_us * 1e-3 + nbytes / (hw.collective_gbps * 1e9) * 1e3


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
    """[units, *shape(s)]: the cached tokens each unit's layer reads at context s (a token
    split: at a rank's share s)."""
    return cost.per_unit(cost.layer_contexts(spec, s, plan.context_shares), plan.micro_batches)


def step_terms(spec, hw, plan: Plan, s, l, b: int, dtype: str, cpu=None):
    """What cost.simulate and cost.intervals take for this plan at a context s (or a 1-D array
    of them) with per-unit l ([units] or [units, contexts]; l beyond what a sliding-window
    layer reads is capped, as the runtime does) and CPU tokens `cpu` (same shape; None: none;
    l is capped at n - cpu): (A, K, R, C, D, head, lookahead, act_chunks) and the keywords
    (weights, front and back, which units are offloaded, the CPU lane's part P). One place,
    so the prediction and the timeline picture never describe different schedules."""
    streamed, m = plan.weights_streamed, plan.micro_batches
    c = cost.layer_costs(spec, hw, b // m, dtype, offloaded=plan.offloaded or any(streamed),
                         shares=plan.context_shares)
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
    if c.merge:  # a token split: each offloaded unit merges the ranks' partials
        kw["merge"] = [0.0 if r else c.merge for r in plan.resident]
    return ((A, K, R, C, D, m * c.head, plan.lookahead, plan.act_chunks),
            {"W": W, "weight_lag": m + 1, "back": c.layer_back, "front": c.layer_front,
             "offloaded": [not r for r in plan.resident], **kw})


def evaluate_arrays(spec, hw, plan: Plan, ctx, l, b, dtype, cpu=None):
    """(step, link busy, GPU busy) per context and the host's time to issue a step, for
    per-unit l and CPU tokens ([units, contexts]). The step total is formed here, and only
    here: the walk, bounded by the host, then (several GPUs) the logits all-gather."""
    args, kw = step_terms(spec, hw, plan, ctx, l, b, dtype, cpu)
    step, link, gpu = cost.simulate(*args, **kw)
    # the host issues the step's nodes one by one; the GPU cannot finish before the last one
    host = host_ms(spec, hw, plan, l)
    step = np.maximum(step, host)
    if plan.world_size > 1:  # every rank waits for the others' logits (or the token)
        step = step + gather_ms(spec, hw, plan.world_size, b, dtype, plan.split)
    return step, link, gpu, host


def host_ms(spec, hw, plan: Plan, l) -> float:
    """Host time to issue one decode step. A unit that recomputes at any context carries its
    clone nodes at every context."""
    ever = (np.asarray(l) > 0).any(axis=-1) if np.ndim(l) > 1 else np.asarray(l) > 0
    graphed = plan.cuda_graphs and hw.device == "cuda"  # CompiledModel's rule
    return cost.host_ms(hw, cost.host_node_kinds(spec, plan.resident, ever, plan.act_chunks,
                                                 plan.weights_streamed, plan.micro_batches,
                                                 graphed), spec)
