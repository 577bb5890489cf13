"""The scheduler: a linear program (pulp + CBC) that splits each layer's context between
recomputed-from-activations, transferred-as-K,V and kept-on-GPU, for every decode step.

How a plan is made (`make_plan`):
1. Memory: weights, staging buffers, workspace and a margin come off `gpu_mem_gb`; what is
   left may hold whole resident layers. Too little even to stream one layer is an error.
2. pipelined only: one LP at the longest context, with a free per-layer GPU fraction z_i
   under the memory budget, says which layers to keep resident (the largest z_i, rounded down
   to whole layers: the runtime keeps a layer's cache entirely on one side).
3. For a few representative contexts (geometric from one chunk to the longest), an LP with
   that residency fixed gives each layer's recompute fraction l_i/s. A context between two
   representatives interpolates the fraction in log s; l is rounded to `chunk_tokens`.
4. The rounded plan is evaluated at every context with cost.simulate (the same inequalities
   as the LP, with fixed costs only where paid); where recomputing nothing is predicted
   faster, that context recomputes nothing. So pipelined is never predicted slower than
   full_offload, and grouped-query models, whose activations are bigger than their K,V,
   recompute nothing: the LP's slope says so, no special case.

Weights (issue 6, first step): when they do not fit next to the staging buffers, the fewest
whole layers whose weights make the budget fit stream from pinned CPU memory (spread evenly;
`schedule.weight_stream_fraction` forces a count). This is a greedy placement made before
the LP, not yet a variable inside it: the LP and `cost.simulate` only charge each streamed
layer's weight copy (a constant W_i on the copy stream, ahead of its activation / K,V copies).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from kvc.planner import cost
from kvc.planner.lp import solve as _solve
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.models.spec import ModelSpec
from kvc.ir.plan import Plan, forced_plan, rounded_fraction, weights_for_fraction
from kvc.ir.modes import mode as mode_of
from kvc.ir.request import PlanRequest

MAX_BUCKETS = 7


def make_plan(spec: ModelSpec, hw: HardwareConfig, req: PlanRequest) -> Plan:
    """The plan for `req`. In a chunked mode (pipelined) `req.act_chunks` is the most chunks
    the activation copy may be split into: more chunks overlap recompute with the copy better
    but cost the host more nodes to issue, so the plan with the lower predicted generation
    time wins (1 or all). `req.micro_batches`: the block schedule's micro-batches per step;
    `req.resident_cache` false: no layer keeps its cache on the GPU; `req.cuda_graphs`: the
    runtime replays the step's static runs as CUDA graphs on a GPU, which the host lane counts."""
    plan = _make_plan(spec, hw, req)
    if req.schedule.chunked and req.recompute_fraction is None and req.act_chunks > 1:
        single = _make_plan(spec, hw, req.but(act_chunks=1))
        if sum(single.predicted_step_ms) < sum(plan.predicted_step_ms):
            plan = single
    _check_host_memory(spec, hw, plan, req.batch_size, req.dtype)
    return plan


def _check_host_memory(spec: ModelSpec, hw: HardwareConfig, plan: Plan, b: int, dtype: str) -> None:
    """The pinned pools must fit `hardware.cpu_mem_gb`: refused here, before any allocation."""
    need = host_memory_gb(spec, plan, b, dtype)
    if need > hw.cpu_mem_gb:
        raise KvcError(
            f"{plan.mode}: the pinned CPU pools need {need:.1f} GB, more than hardware.cpu_mem_gb = "
            f"{hw.cpu_mem_gb:g}; lower workload.batch_size or the context, or raise cpu_mem_gb "
            "if the machine has the memory")


def host_memory_gb(spec: ModelSpec, plan: Plan, b: int, dtype: str) -> float:
    """Pinned host memory the runtime allocates for the plan's own workload: the offloaded
    units' cache pools (each of b / micro_batches sequences), trimmed to the rows the plan
    reads back (cost.host_pool_bytes), and the streamed weights."""
    s_max = plan.prompt_len + plan.gen_len
    p = cost.dtype_bytes(dtype)
    act_rows = min(s_max, plan.max_recompute_tokens(s_max))
    kv_lo = max(0, min(s_max, plan.min_kv_row(s_max)))
    pools = cost.host_pool_bytes(spec, b // plan.micro_batches, s_max, p,
                                 sum(not r for r in plan.resident), act_rows, kv_lo)
    return (pools + sum(plan.weights_streamed) * cost.layer_weight_bytes(spec, p)) / cost.GB


def _make_plan(spec: ModelSpec, hw: HardwareConfig, req: PlanRequest) -> Plan:
    batch_size, prompt_len, gen_len, dtype = req.batch_size, req.prompt_len, req.gen_len, req.dtype
    mode, sched, chunk_tokens, act_chunks = req.mode, req.schedule, req.chunk_tokens, req.act_chunks
    recompute_fraction, weight_stream_fraction = req.recompute_fraction, req.weight_stream_fraction
    m, resident_cache, cuda_graphs = req.micro_batches, req.resident_cache, req.cuda_graphs
    t0 = time.perf_counter()
    deadline = t0 + req.time_limit_s
    L, s_max = spec.num_layers, prompt_len + gen_len
    ov = sched.overlap(act_chunks)
    look, chunks = ov["lookahead"], ov["act_chunks"]
    ctx = np.arange(prompt_len, s_max + 1)
    buffers = look + 1 if sched.offloads else 0
    mem_args = (spec, hw, batch_size, s_max, dtype, mode)
    c = cost.layer_costs(spec, hw, batch_size // m, dtype, offloaded=sched.offloads)
    if weight_stream_fraction is not None:
        streamed = tuple(float(w) for w in weights_for_fraction(L, weight_stream_fraction))
    else:
        streamed = _place_weights(c, *mem_args, buffers, look, chunks, m, recompute_fraction,
                                  deadline)
    if any(streamed):
        c = cost.layer_costs(spec, hw, batch_size // m, dtype, offloaded=True)
    common = dict(mode=mode, num_layers=L, prompt_len=prompt_len, gen_len=gen_len,
                  chunk_tokens=chunk_tokens, batch_size=batch_size, dtype=dtype,
                  weights_streamed=streamed, micro_batches=m, cuda_graphs=cuda_graphs, **ov)
    with_act = sched.recomputes and recompute_fraction != 0
    mem = _check_memory(*mem_args, buffers=buffers, with_act=with_act, streamed=streamed,
                        micro_batches=m)
    resident = (not sched.offloads,) * L
    fractions_needed = sched.recomputes
    notes: dict = {"memory_gb": _round(mem)}
    if any(streamed) and weight_stream_fraction is None:
        notes["weights"] = (f"{sum(streamed):.2f} of {L} layers' weights stream from CPU: the LP's "
                            "per-layer fractions, rounded up to whole parameters")

    if recompute_fraction is not None:
        plan = forced_plan(mode, L, prompt_len, gen_len, chunk_tokens, recompute_fraction,
                           act_chunks, micro_batches=m)
        plan = replace(plan, batch_size=batch_size, dtype=dtype, weights_streamed=streamed,
                       cuda_graphs=cuda_graphs)
        steps = _evaluate(spec, hw, plan, ctx, batch_size, dtype)[0]
        return replace(plan, predicted_step_ms=tuple(float(round(v, 6)) for v in steps),
                       notes={**notes, "forced": True})

    wcopy = list(streamed) and [w * c.weight_copy for w in streamed]
    lp = dict(look=look, chunks=chunks, deadline=deadline, wcopy=wcopy, m=m)
    recompute = np.zeros((L, len(ctx)), dtype=np.int64)
    if fractions_needed and mem.get("recompute_disabled"):
        notes["recompute_disabled"] = mem["recompute_disabled"]
    elif fractions_needed:
        if sched.keeps_resident and resident_cache and mem["free_gb"] >= mem["layer_kv_gb"]:
            z = _solve(c, L, s_max, resident=resident,
                       mem_budget=(mem["free_gb"], mem["layer_kv_gb"]), **lp)[1]
            n_res = min(L, int(math.floor(sum(z) + 1e-6)),
                        int(mem["free_gb"] // mem["layer_kv_gb"]))
            keep = sorted(range(L), key=lambda i: (-round(z[i], 6), i))[:n_res]
            resident = tuple(i in keep for i in range(L))
        if all(resident):
            fractions_needed = False  # everything fits on the GPU: nothing left to split
    if fractions_needed and not mem.get("recompute_disabled"):
        reps = _representatives(prompt_len, s_max, chunk_tokens)
        fr = np.array([_solve(c, L, s, resident=resident, **lp)[0] for s in reps]).T
        notes["buckets"] = [int(s) for s in reps]
        recompute = _round_to_chunks(fr, reps, ctx, chunk_tokens)
    plan = Plan(resident=tuple(cost.per_unit(resident, m).tolist()), recompute=(), **common)
    steps = _evaluate_arrays(spec, hw, plan, ctx, cost.per_unit(recompute, m), batch_size, dtype)[0]
    if recompute.any():
        # the LP charged per-copy / per-chunk fixed costs to every layer, and rounding moved
        # l; wherever recomputing nothing is predicted faster, recompute nothing
        none = np.zeros((plan.num_units, len(ctx)), dtype=np.int64)
        steps0 = _evaluate_arrays(spec, hw, plan, ctx, none, batch_size, dtype)[0]
        worse = steps0 < steps
        recompute[:, worse] = 0
        steps = np.where(worse, steps0, steps)
    if (sched.keeps_resident and resident_cache and not recompute.any()
            and "act" in mem.get("staging_for", "")):
        # nothing recomputed (e.g. grouped-query models): the activation staging is not
        # needed, and its memory holds more resident layers, which never slow a step
        bare = cost.memory_terms(spec, hw, batch_size, s_max, dtype, look + 1, False, streamed, m)
        n_max = min(L, int(max(0.0, bare["free_gb"]) // bare["layer_kv_gb"]))
        extra = [i for i in range(L) if not resident[i]][:max(0, n_max - sum(resident))]
        if extra:
            resident = tuple(r or i in extra for i, r in enumerate(resident))
            plan = replace(plan, resident=tuple(cost.per_unit(resident, m).tolist()))
            steps = _evaluate_arrays(spec, hw, plan, ctx, cost.per_unit(recompute, m),
                                     batch_size, dtype)[0]
            notes["memory_gb"] = _round({**bare, "staging_for": "kv"})
    notes["solve_s"] = round(time.perf_counter() - t0, 4)
    rows = cost.per_unit(recompute, m)
    return replace(plan, recompute=tuple(map(tuple, rows.T.tolist())),
                   predicted_step_ms=tuple(float(round(v, 6)) for v in steps), notes=notes)


def predict(spec: ModelSpec, hw: HardwareConfig, plan: Plan, s: int, batch_size: int,
            dtype: str) -> dict:
    """Predicted decode step at context s: total and the busy time of the link and the GPU."""
    if plan.batch_size and (plan.batch_size, plan.dtype) != (batch_size, dtype):
        raise KvcError(f"the plan was made for batch {plan.batch_size} {plan.dtype}, "
                       f"not batch {batch_size} {dtype}; make a plan for this workload")
    step, link, gpu, host, moved = _evaluate(spec, hw, plan, np.array([s]), batch_size, dtype)
    step, link, gpu = float(step[0]), float(link[0]), float(gpu[0])
    return {"predicted_step_ms": step, "link_busy_ms": link, "gpu_busy_ms": gpu, "host_ms": host,
            "gpu_idle_ms": max(0.0, step - gpu), "link_idle_ms": max(0.0, step - link),
            "h2d_bytes": int(moved[0])}


# --- evaluation ------------------------------------------------------------------------------

def _evaluate(spec, hw, plan: Plan, ctx: np.ndarray, b: int, dtype: str):
    l = np.array([[plan.recompute_tokens(u, int(s)) for s in ctx] for u in range(plan.num_units)])
    step, link, gpu, host = _evaluate_arrays(spec, hw, plan, ctx, l, b, dtype)
    p = cost.dtype_bytes(dtype)
    bm = b // plan.micro_batches
    off = ~np.array(plan.resident)[:, None]
    moved = (cost.act_bytes(spec, bm, l, p) + cost.kv_bytes(spec, bm, ctx[None, :] - l, p)) * off
    weights = sum(plan.weights_streamed) * cost.layer_weight_bytes(spec, p)
    return step, link, gpu, host, moved.sum(axis=0) + weights


def step_terms(spec, hw, plan: Plan, s, l, b: int, dtype: str):
    """What cost.simulate and cost.intervals take for this plan at a context s (or a 1-D array
    of them) with per-unit l ([units] or [units, contexts]): (A, K, R, C, D, head, lookahead,
    act_chunks) and the weight keywords. One place, so the prediction and the timeline picture
    never describe different schedules."""
    streamed, m = plan.weights_streamed, plan.micro_batches
    c = cost.layer_costs(spec, hw, b // m, dtype, offloaded=plan.offloaded or any(streamed))
    trailing = np.shape(s)
    res = np.array(plan.resident).reshape((-1,) + (1,) * len(trailing))
    A, K, R, C, D = cost.durations(c, np.asarray(s)[None, ...], l, res, plan.act_chunks)
    W = cost.weight_durations(c, streamed, trailing, m) if any(streamed) else None
    return ((A, K, R, C, D, m * c.head, plan.lookahead, plan.act_chunks),
            {"W": W, "weight_lag": m + 1, "back": c.layer_back, "front": c.layer_front,
             "offloaded": [not r for r in plan.resident]})


def _evaluate_arrays(spec, hw, plan: Plan, ctx, l, b, dtype):
    """(step, link busy, GPU busy) per context and the host's time to issue a step, for
    per-unit l ([units, contexts])."""
    args, kw = step_terms(spec, hw, plan, ctx, l, b, dtype)
    step, link, gpu = cost.simulate(*args, **kw)
    # the host issues the step's nodes one by one; the GPU cannot finish before the last one
    host = _host_ms(spec, hw, plan, l)
    return np.maximum(step, host), link, gpu, host


def _host_ms(spec, hw, plan: Plan, l) -> float:
    """Host time to issue one decode step. A unit that recomputes at any context carries its
    clone nodes at every context."""
    ever = (np.asarray(l) > 0).any(axis=-1) if np.ndim(l) > 1 else np.asarray(l) > 0
    graphed = plan.cuda_graphs and hw.device == "cuda"  # CompiledModel's rule
    return cost.host_ms(hw, cost.host_node_kinds(spec, plan.resident, ever, plan.act_chunks,
                                                 plan.weights_streamed, plan.micro_batches,
                                                 graphed), spec)


# --- memory ----------------------------------------------------------------------------------

def _place_weights(c, spec, hw, b, s_max, dtype, mode, buffers, look, chunks, m,
                   recompute_fraction, deadline) -> tuple[float, ...]:
    """Weight placement: () when every layer's weights fit next to the cache's staging;
    otherwise per layer the fraction of its weights streamed from pinned CPU memory, as the LP
    at the longest context chooses it under the GPU budget (with the split of that context
    free, or fixed by the mode), each rounded up to whole parameters (largest first).
    gpu_resident is the no-offload bound: it never streams on its own (weight_stream_fraction
    can force it). Where even streaming every layer does not fit, the error names the
    shortfall."""
    from kvc.models import layer_param_sizes

    L = spec.num_layers
    args = (spec, hw, b, s_max, dtype, buffers, False)
    if not mode_of(mode).offloads or cost.memory_terms(*args, 0, m)["free_gb"] >= 0:
        return ()
    every = cost.memory_terms(*args, L, m)
    if every["free_gb"] < 0:
        raise KvcError(
            f"{mode}: GPU memory is {-every['free_gb']:.2f} GB short of streaming even one layer, "
            f"with every layer's weights streamed from CPU: resident weights "
            f"{every['weights_gb']:.2f} GB + weight slots {every['weight_slots_gb']:.2f} GB + "
            f"staging {every['staging_gb']:.2f} GB + workspace {every['workspace_gb']:.2f} GB + "
            f"margin {every['margin_gb']:g} GB > hardware.gpu_mem_gb = {hw.gpu_mem_gb:g}; "
            "lower workload.batch_size or the context")
    p = cost.dtype_bytes(dtype)
    layer_gb = cost.layer_weight_bytes(spec, p) / cost.GB
    # what is left for layer weights and their two slots with every layer streamed
    room = every["free_gb"] + every["weight_slots_gb"] + L * layer_gb
    fixed = None if mode_of(mode).recomputes and recompute_fraction is None else (
        0.0 if recompute_fraction is None else recompute_fraction)
    w = _solve(c, L, s_max, look=look, chunks=chunks, resident=(False,) * L, deadline=deadline,
               m=m, weight_budget=(c.weight_copy, layer_gb, room), fixed_x=fixed)[2]
    sizes = layer_param_sizes(spec)
    out = [rounded_fraction(sizes, f) if f > 1e-6 else 0.0 for f in w]
    # rounding up streams at least what the LP chose; a vertex at exactly the budget may
    # still be a hair short after rounding: stream the next layer whole until it fits
    for i in sorted(range(L), key=lambda i: -out[i]):
        if cost.memory_terms(*args, out, m)["free_gb"] >= 0:
            break
        out[i] = 1.0
    return tuple(out)


def _check_memory(spec, hw, b, s_max, dtype, mode, buffers, with_act, streamed=(),
                  micro_batches: int = 1) -> dict:
    m = micro_batches
    if not mode_of(mode).offloads:
        t = cost.memory_terms(spec, hw, b, s_max, dtype, 0, False, streamed, m)
        need = t["layer_kv_gb"] * spec.num_layers - t["free_gb"]
        if need > 0:
            raise KvcError(
                f"gpu_resident does not fit: needs {need:.1f} GB more than hardware.gpu_mem_gb = "
                f"{hw.gpu_mem_gb:g} (weights {t['weights_gb']:.1f} GB + KV cache "
                f"{t['layer_kv_gb'] * spec.num_layers:.1f} GB + workspace {t['workspace_gb']:.1f} GB"
                f" + margin {t['margin_gb']:g} GB); use an offloading mode")
        return t
    bare = {**cost.memory_terms(spec, hw, b, s_max, dtype, buffers, False, streamed, m),
            "staging_for": "kv"}
    if bare["free_gb"] < 0:
        raise KvcError(
            f"{mode}: GPU memory is {-bare['free_gb']:.2f} GB short of streaming even one layer: "
            f"weights {bare['weights_gb']:.2f} GB + staging {bare['staging_gb']:.2f} GB + "
            f"workspace {bare['workspace_gb']:.2f} GB + margin {bare['margin_gb']:g} GB > "
            f"hardware.gpu_mem_gb = {hw.gpu_mem_gb:g}; lower workload.batch_size or the context")
    if not with_act:
        return bare
    t = cost.memory_terms(spec, hw, b, s_max, dtype, buffers, True, streamed, m)
    if t["free_gb"] < 0:
        bare["recompute_disabled"] = (f"activation staging needs {-t['free_gb']:.2f} GB more "
                                      f"GPU memory; planned without recompute")
        return bare
    return {**t, "staging_for": "kv+act"}


def _representatives(lo: int, hi: int, chunk: int) -> list[int]:
    """Contexts to solve at: geometric between one chunk (below it, l rounds to 0) and hi."""
    a = max(lo, min(chunk, hi))
    if hi <= a:
        return [hi]
    n = min(MAX_BUCKETS, max(2, math.ceil(math.log2(hi / a)) + 1))
    pts = sorted({int(round(a * (hi / a) ** (k / (n - 1)))) for k in range(n)})
    return pts


def _round_to_chunks(fr: np.ndarray, reps: list[int], ctx: np.ndarray, chunk: int) -> np.ndarray:
    """Per-layer fraction at each context (log-interpolated), then l in whole chunks <= s."""
    logs = np.log(np.asarray(reps, dtype=float))
    lc = np.log(ctx.astype(float))
    f = np.stack([np.interp(lc, logs, row) for row in fr]) if len(reps) > 1 else fr.repeat(len(ctx), 1)
    l = np.rint(f * ctx / chunk).astype(np.int64) * chunk
    return np.minimum(l, (ctx // chunk) * chunk)


def _round(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


# --- policy search ---------------------------------------------------------------------------

def search_policy(spec: ModelSpec, hw: HardwareConfig, req: PlanRequest, batch_sizes,
                  micro_batches=(1, 2, 4, 8), tried: list | None = None) -> tuple[Plan, float]:
    """The outer search, like FlexGen's policy search but with recompute inside the LP: for
    every total batch in `batch_sizes` and micro-batch count in `micro_batches` that divides
    it, make the plan (its LP places weights, residency and recompute, and its memory checks
    refuse what does not fit the GPU or the host); keep the one with the highest predicted
    decode throughput, batch * gen_len / sum of predicted step times. Returns (plan, tokens/s).
    Raises the last refusal when nothing fits. `tried` (a list) receives one dict per
    candidate: batch, micro_batches, and tokens_per_s or the refusal."""
    best, best_tps, last = None, -1.0, None
    for b in sorted(set(batch_sizes)):
        for m in sorted(set(micro_batches)):
            if b % m:
                continue
            try:
                plan = make_plan(spec, hw, req.but(batch_size=b, micro_batches=m))
            except KvcError as e:
                last = e
                if tried is not None:
                    tried.append({"batch": b, "micro_batches": m, "refused": str(e)})
                continue
            tps = b * len(plan.predicted_step_ms) / (sum(plan.predicted_step_ms) / 1e3)
            if tried is not None:
                tried.append({"batch": b, "micro_batches": m, "tokens_per_s": tps})
            if tps > best_tps:
                best, best_tps = plan, tps
    if best is None:
        raise last or KvcError("search_policy: no batch size to try")
    return best, best_tps
