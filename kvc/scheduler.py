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
import warnings
from dataclasses import replace

import numpy as np
import pulp

from kvc import cost
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.models.spec import ModelSpec
from kvc.plan import (
    MODES,
    Plan,
    forced_plan,
    overlap_for,
    spread_layers,
    weights_for_fraction,
)

MAX_BUCKETS = 7


def make_plan(spec: ModelSpec, hw: HardwareConfig, *, batch_size: int, prompt_len: int,
              gen_len: int, dtype: str, mode: str, chunk_tokens: int = 64, act_chunks: int = 4,
              recompute_fraction: float | None = None,
              weight_stream_fraction: float | None = None, time_limit_s: float = 10.0) -> Plan:
    """The plan for `mode`. For pipelined, `act_chunks` is the most chunks the activation copy
    may be split into: more chunks overlap recompute with the copy better but cost the host
    more nodes to issue, so the plan with the lower predicted generation time wins (1 or all)."""
    kw = dict(batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len, dtype=dtype,
              mode=mode, chunk_tokens=chunk_tokens, recompute_fraction=recompute_fraction,
              weight_stream_fraction=weight_stream_fraction, time_limit_s=time_limit_s)
    plan = _make_plan(spec, hw, act_chunks=act_chunks, **kw)
    if mode == "pipelined" and recompute_fraction is None and act_chunks > 1:
        single = _make_plan(spec, hw, act_chunks=1, **kw)
        if sum(single.predicted_step_ms) < sum(plan.predicted_step_ms):
            plan = single
    _check_host_memory(spec, hw, plan, batch_size, dtype)
    return plan


def host_memory_gb(spec: ModelSpec, plan: Plan, b: int, dtype: str) -> float:
    """Pinned host memory the runtime allocates for the plan's own workload: the cache pools,
    trimmed to the rows the plan reads back (cost.host_pool_bytes), and the streamed weights."""
    s_max = plan.prompt_len + plan.gen_len
    p = cost.dtype_bytes(dtype)
    act_rows = min(s_max, plan.max_recompute_tokens(s_max))
    kv_lo = max(0, min(s_max, plan.min_kv_row(s_max)))
    return (cost.host_pool_bytes(spec, b, s_max, p, sum(not r for r in plan.resident), act_rows, kv_lo)
            + len(plan.streamed_layers) * cost.layer_weight_bytes(spec, p)) / cost.GB


def _check_host_memory(spec: ModelSpec, hw: HardwareConfig, plan: Plan, b: int, dtype: str) -> None:
    """The pinned pools must fit `hardware.cpu_mem_gb`: refused here, before any allocation."""
    need = host_memory_gb(spec, plan, b, dtype)
    if need > hw.cpu_mem_gb:
        raise KvcError(
            f"{plan.mode}: the pinned CPU pools need {need:.1f} GB, more than hardware.cpu_mem_gb = "
            f"{hw.cpu_mem_gb:g}; lower workload.batch_size or the context, or raise cpu_mem_gb "
            "if the machine has the memory")


def _make_plan(spec: ModelSpec, hw: HardwareConfig, *, batch_size: int, prompt_len: int,
               gen_len: int, dtype: str, mode: str, chunk_tokens: int, act_chunks: int,
               recompute_fraction: float | None, weight_stream_fraction: float | None,
               time_limit_s: float) -> Plan:
    if mode not in MODES:
        raise KvcError(f"schedule.mode {mode!r}: expected one of {list(MODES)}")
    for name, v, least in (("batch_size", batch_size, 1), ("prompt_len", prompt_len, 1),
                           ("gen_len", gen_len, 0), ("chunk_tokens", chunk_tokens, 1),
                           ("act_chunks", act_chunks, 1)):
        if int(v) != v or v < least:
            raise KvcError(f"{name} = {v!r}: expected an integer >= {least}")
    t0 = time.perf_counter()
    L, s_max = spec.num_layers, prompt_len + gen_len
    ov = overlap_for(mode, act_chunks)
    look, chunks = ov["lookahead"], ov["act_chunks"]
    ctx = np.arange(prompt_len, s_max + 1)
    buffers = 0 if mode == "gpu_resident" else look + 1
    if weight_stream_fraction is not None:
        if not 0.0 <= weight_stream_fraction <= 1.0:
            raise KvcError(f"schedule.weight_stream_fraction = {weight_stream_fraction}: expected 0..1")
        streamed = weights_for_fraction(L, weight_stream_fraction)
    else:
        streamed = _fewest_streamed(spec, hw, batch_size, s_max, dtype, mode, buffers)
    n_w = sum(streamed)
    common = dict(mode=mode, num_layers=L, prompt_len=prompt_len, gen_len=gen_len,
                  chunk_tokens=chunk_tokens, batch_size=batch_size, dtype=dtype,
                  weights_streamed=streamed, **ov)

    if mode == "gpu_resident":
        mem = _check_memory(spec, hw, batch_size, s_max, dtype, mode, buffers=0, with_act=False,
                            streamed=n_w)
        resident, fractions_needed = (True,) * L, False
    elif mode == "full_offload":
        mem = _check_memory(spec, hw, batch_size, s_max, dtype, mode, buffers=look + 1,
                            with_act=False, streamed=n_w)
        resident, fractions_needed = (False,) * L, False
    else:
        mem = _check_memory(spec, hw, batch_size, s_max, dtype, mode, buffers=look + 1,
                            with_act=recompute_fraction != 0, streamed=n_w)
        resident, fractions_needed = (False,) * L, True
    notes: dict = {"memory_gb": _round(mem)}
    if n_w and weight_stream_fraction is None:
        notes["weights"] = (f"{n_w} of {L} layers stream their weights: the fewest that fit "
                            "gpu_mem_gb (greedy, spread evenly; not an LP variable yet)")

    if recompute_fraction is not None:
        if not 0.0 <= recompute_fraction <= 1.0:
            raise KvcError(f"schedule.recompute_fraction = {recompute_fraction}: expected 0..1")
        plan = forced_plan(mode, L, prompt_len, gen_len, chunk_tokens, recompute_fraction, act_chunks)
        plan = replace(plan, batch_size=batch_size, dtype=dtype, weights_streamed=streamed)
        steps = _evaluate(spec, hw, plan, ctx, batch_size, dtype)[0]
        return replace(plan, predicted_step_ms=tuple(float(round(v, 6)) for v in steps),
                       notes={**notes, "forced": True})

    c = cost.layer_costs(spec, hw, batch_size, dtype, offloaded=mode != "gpu_resident" or n_w > 0)
    wcopy = [c.weight_copy if w else 0.0 for w in (streamed or (False,) * L)]
    recompute = np.zeros((L, len(ctx)), dtype=np.int64)
    if fractions_needed and mem.get("recompute_disabled"):
        notes["recompute_disabled"] = mem["recompute_disabled"]
    elif fractions_needed:
        deadline = t0 + time_limit_s
        if mode == "pipelined" and mem["free_gb"] >= mem["layer_kv_gb"]:
            z = _solve(c, L, s_max, look, chunks, resident, deadline,
                       mem_budget=(mem["free_gb"], mem["layer_kv_gb"]), wcopy=wcopy)[1]
            n_res = min(L, int(math.floor(sum(z) + 1e-6)),
                        int(mem["free_gb"] // mem["layer_kv_gb"]))
            keep = sorted(range(L), key=lambda i: (-round(z[i], 6), i))[:n_res]
            resident = tuple(i in keep for i in range(L))
        if all(resident):
            fractions_needed = False  # everything fits on the GPU: nothing left to split
    if fractions_needed and not mem.get("recompute_disabled"):
        reps = _representatives(prompt_len, s_max, chunk_tokens)
        fr = np.array([_solve(c, L, s, look, chunks, resident, deadline, wcopy=wcopy)[0]
                       for s in reps]).T
        notes["buckets"] = [int(s) for s in reps]
        recompute = _round_to_chunks(fr, reps, ctx, chunk_tokens)
    plan = Plan(resident=resident, recompute=(), **common)
    steps, _, _ = _evaluate_arrays(spec, hw, plan, ctx, recompute, batch_size, dtype)
    if recompute.any():
        # the LP charged per-copy / per-chunk fixed costs to every layer, and rounding moved
        # l; wherever recomputing nothing is predicted faster, recompute nothing
        none = np.zeros_like(recompute)
        steps0 = _evaluate_arrays(spec, hw, plan, ctx, none, batch_size, dtype)[0]
        worse = steps0 < steps
        recompute[:, worse] = 0
        steps = np.where(worse, steps0, steps)
    if mode == "pipelined" and not recompute.any() and "act" in mem.get("staging_for", ""):
        # nothing recomputed (e.g. grouped-query models): the activation staging is not
        # needed, and its memory holds more resident layers, which never slow a step
        bare = cost.memory_terms(spec, hw, batch_size, s_max, dtype, look + 1, False, n_w)
        n_max = min(L, int(max(0.0, bare["free_gb"]) // bare["layer_kv_gb"]))
        extra = [i for i in range(L) if not resident[i]][:max(0, n_max - sum(resident))]
        if extra:
            resident = tuple(r or i in extra for i, r in enumerate(resident))
            plan = replace(plan, resident=resident)
            steps = _evaluate_arrays(spec, hw, plan, ctx, recompute, batch_size, dtype)[0]
            notes["memory_gb"] = _round({**bare, "staging_for": "kv"})
    notes["solve_s"] = round(time.perf_counter() - t0, 4)
    return replace(plan, recompute=tuple(map(tuple, recompute.T.tolist())),
                   predicted_step_ms=tuple(float(round(v, 6)) for v in steps), notes=notes)


def predict(spec: ModelSpec, hw: HardwareConfig, plan: Plan, s: int, batch_size: int,
            dtype: str) -> dict:
    """Predicted decode step at context s: total and the busy time of the link and the GPU."""
    if plan.batch_size and (plan.batch_size, plan.dtype) != (batch_size, dtype):
        raise KvcError(f"the plan was made for batch {plan.batch_size} {plan.dtype}, "
                       f"not batch {batch_size} {dtype}; make a plan for this workload")
    step, link, gpu, moved = _evaluate(spec, hw, plan, np.array([s]), batch_size, dtype)
    step, link, gpu = float(step[0]), float(link[0]), float(gpu[0])
    return {"predicted_step_ms": step, "link_busy_ms": link, "gpu_busy_ms": gpu,
            "gpu_idle_ms": max(0.0, step - gpu), "link_idle_ms": max(0.0, step - link),
            "h2d_bytes": int(moved[0])}


# --- evaluation ------------------------------------------------------------------------------

def _evaluate(spec, hw, plan: Plan, ctx: np.ndarray, b: int, dtype: str):
    l = np.array([[plan.recompute_tokens(i, int(s)) for s in ctx] for i in range(plan.num_layers)])
    step, link, gpu = _evaluate_arrays(spec, hw, plan, ctx, l, b, dtype)
    p = cost.dtype_bytes(dtype)
    off = ~np.array(plan.resident)[:, None]
    moved = (cost.act_bytes(spec, b, l, p) + cost.kv_bytes(spec, b, ctx[None, :] - l, p)) * off
    weights = len(plan.streamed_layers) * cost.layer_weight_bytes(spec, p)
    return step, link, gpu, moved.sum(axis=0) + weights


def _evaluate_arrays(spec, hw, plan: Plan, ctx, l, b, dtype):
    streamed = plan.weights_streamed
    c = cost.layer_costs(spec, hw, b, dtype, offloaded=plan.offloaded or any(streamed))
    res = np.array(plan.resident)[:, None]
    A, K, R, C, D = cost.durations(c, ctx[None, :], l, res, plan.act_chunks)
    W = cost.weight_durations(c, streamed, (len(ctx),)) if any(streamed) else None
    step, link, gpu = cost.simulate(A, K, R, C, D, c.head, plan.lookahead, plan.act_chunks, W=W)
    # the host issues the step's nodes one by one; the GPU cannot finish before the last one.
    # A layer that recomputes at any context carries its clone nodes at every context.
    ever = (np.asarray(l) > 0).any(axis=-1) if np.ndim(l) > 1 else np.asarray(l) > 0
    host = cost.host_nodes(spec, plan.resident, ever, plan.act_chunks,
                           streamed) * hw.host_op_us * 1e-3
    return np.maximum(step, host), link, gpu


# --- memory ----------------------------------------------------------------------------------

def _fits(spec, hw, b, s_max, dtype, buffers, streamed: int) -> float:
    """GB to spare (negative: short) with `streamed` layers' weights on the CPU."""
    return cost.memory_terms(spec, hw, b, s_max, dtype, buffers, False, streamed)["free_gb"]


def _fewest_streamed(spec, hw, b, s_max, dtype, mode, buffers) -> tuple[bool, ...]:
    """Greedy weight placement: the fewest whole layers whose weights, streamed from pinned CPU
    memory through two GPU weight slots, make the budget fit; () when everything fits. Where
    even streaming every layer does not fit, the error names the shortfall. gpu_resident is
    the no-offload bound: it never streams on its own (weight_stream_fraction can force it)."""
    L = spec.num_layers
    if mode == "gpu_resident" or _fits(spec, hw, b, s_max, dtype, buffers, 0) >= 0:
        return ()
    for n in range(1, L + 1):
        if _fits(spec, hw, b, s_max, dtype, buffers, n) >= 0:
            return spread_layers(L, n)
    m = cost.memory_terms(spec, hw, b, s_max, dtype, buffers, False, L)
    raise KvcError(
        f"{mode}: GPU memory is {-m['free_gb']:.2f} GB short of streaming even one layer, with "
        f"every layer's weights streamed from CPU: resident weights {m['weights_gb']:.2f} GB + "
        f"weight slots {m['weight_slots_gb']:.2f} GB + staging {m['staging_gb']:.2f} GB + "
        f"workspace {m['workspace_gb']:.2f} GB + margin {m['margin_gb']:g} GB > "
        f"hardware.gpu_mem_gb = {hw.gpu_mem_gb:g}; lower workload.batch_size or the context")


def _check_memory(spec, hw, b, s_max, dtype, mode, buffers, with_act, streamed: int = 0) -> dict:
    if mode == "gpu_resident":
        m = cost.memory_terms(spec, hw, b, s_max, dtype, 0, False, streamed)
        need = m["layer_kv_gb"] * spec.num_layers - m["free_gb"]
        if need > 0:
            raise KvcError(
                f"gpu_resident does not fit: needs {need:.1f} GB more than hardware.gpu_mem_gb = "
                f"{hw.gpu_mem_gb:g} (weights {m['weights_gb']:.1f} GB + KV cache "
                f"{m['layer_kv_gb'] * spec.num_layers:.1f} GB + workspace {m['workspace_gb']:.1f} GB"
                f" + margin {m['margin_gb']:g} GB); use an offloading mode")
        return m
    bare = {**cost.memory_terms(spec, hw, b, s_max, dtype, buffers, False, streamed),
            "staging_for": "kv"}
    if bare["free_gb"] < 0:
        raise KvcError(
            f"{mode}: GPU memory is {-bare['free_gb']:.2f} GB short of streaming even one layer: "
            f"weights {bare['weights_gb']:.2f} GB + staging {bare['staging_gb']:.2f} GB + "
            f"workspace {bare['workspace_gb']:.2f} GB + margin {bare['margin_gb']:g} GB > "
            f"hardware.gpu_mem_gb = {hw.gpu_mem_gb:g}; lower workload.batch_size or the context")
    if not with_act:
        return bare
    m = cost.memory_terms(spec, hw, b, s_max, dtype, buffers, True, streamed)
    if m["free_gb"] < 0:
        bare["recompute_disabled"] = (f"activation staging needs {-m['free_gb']:.2f} GB more "
                                      f"GPU memory; planned without recompute")
        return bare
    return {**m, "staging_for": "kv+act"}


# --- the LP ----------------------------------------------------------------------------------

def _solve(c: cost.LayerCosts, L: int, s: int, look: int, chunks: int, resident, deadline: float,
           mem_budget: tuple[float, float] | None = None, wcopy=None, with_step: bool = False):
    """One decode step at context s as an LP. Returns (l_i/s, z_i) per layer.

    Variables: x_i (recomputed fraction), z_i (kept-on-GPU fraction, only with mem_budget);
    the K,V fraction is 1 - x_i - z_i. Times: P_i copy start, Q_ik recompute chunk k start,
    E_i compute end, W_i write-back end, T the step. Same inequalities as cost.simulate.
    `wcopy[i]`: the layer's weight copy (a constant, 0 unless it streams its weights), first
    on the copy stream; nothing of the layer starts before it lands. `with_step`: also
    return the optimal step time T (tests hold it to cost.simulate).
    """
    wcopy = wcopy or [0.0] * L
    prob = pulp.LpProblem("kvc_step", pulp.LpMinimize)
    V = prob.add_variable  # pulp 3.3+: variables belong to their problem
    T = V("T", 0)
    prob += T
    zero = pulp.LpAffineExpression()
    x, z = [], []
    for i in range(L):
        if resident[i]:
            x.append(zero)
            z.append(zero)
            continue
        x.append(V(f"x{i}", 0, 1))
        z.append(V(f"z{i}", 0, 1) if mem_budget else zero)
        if mem_budget:
            prob += x[i] + z[i] <= 1
    E, P, copy_end = [], None, None
    W = None
    C = c.layer_fixed + c.attn_per_tok * (s + 1)
    for i in range(L):
        off = not resident[i]
        A = (c.act_per_tok * s) * x[i] + chunks * c.copy_fixed if off else zero
        K = ((c.kv_per_tok * s) * (1 - x[i] - z[i]) + 2 * c.copy_fixed) if off else zero
        R = (c.rec_per_tok * s) * x[i] + chunks * c.rec_chunk_fixed if off else zero
        P = V(f"P{i}", 0)
        if copy_end is not None:
            prob += P >= copy_end  # one copy stream
        if i - 1 - look >= 0:
            prob += P >= E[i - 1 - look]  # staging buffer i mod (look+1) is free
        prev = None
        for k in range(1, chunks + 1):
            Q = V(f"Q{i}_{k}", 0)
            if off or wcopy[i]:
                prob += Q >= P + wcopy[i] + (k / chunks) * A  # chunk k (and the weights) landed
            if prev is not None:
                prob += Q >= prev + (1.0 / chunks) * R
            elif i:
                prob += Q >= E[i - 1]
            prev = Q
        copy_end = P + wcopy[i] + A + K if wcopy[i] else P + A + K
        E.append(V(f"E{i}", 0))
        prob += E[i] >= prev + (1.0 / chunks) * R + C
        if off or wcopy[i]:
            prob += E[i] >= copy_end + C  # the K,V tail (and the weights) have landed
        Dw = c.writeback if off else 0.0
        Wn = V(f"W{i}", 0)
        prob += Wn >= E[i] + Dw
        if W is not None:
            prob += Wn >= W + Dw
        W = Wn
    prob += T >= E[-1] + c.head
    prob += T >= W
    if mem_budget:
        free, per_layer = mem_budget
        prob += pulp.lpSum(z) * per_layer <= free, "gpu_memory"
    left = max(0.5, deadline - time.perf_counter())
    with warnings.catch_warnings():
        # PULP_CBC_CMD (the CBC bundled with pulp) is deprecated for pulp 4, which drops the
        # bundle; until then it is the one solver every install has
        warnings.simplefilter("ignore", DeprecationWarning)
        status = prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=left))
    if pulp.LpStatus[status] != "Optimal" or prob.sol_status != pulp.LpSolutionOptimal:
        what = pulp.LpStatus[status]
        sol = pulp.LpSolution.get(prob.sol_status, str(prob.sol_status))
        hint = ("the GPU memory constraint (resident layers vs gpu_mem_gb)" if what == "Infeasible"
                else f"no optimal solution within schedule.solver_time_limit_s ({left:.1f} s left)")
        raise KvcError(f"scheduler LP at context {s} failed: status {what}, solution {sol}; "
                       f"binding: {hint}")
    val = lambda e: float(pulp.value(e) or 0.0) if not isinstance(e, pulp.LpAffineExpression) else 0.0
    xs, zs = [min(1.0, max(0.0, val(v))) for v in x], [min(1.0, max(0.0, val(v))) for v in z]
    return (xs, zs, float(pulp.value(T))) if with_step else (xs, zs)


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
