"""The scheduler's linear program (pulp + CBC), generated from the step's walk (kvc.planner.lanes).

Variables per layer: x_i (recomputed fraction), z_i (kept-on-GPU fraction, only with a memory
budget), w_i (fraction of its weights streamed, only with a weight budget), y_i (fraction
attended to on the CPU, only with the CPU lane on: issue 17); the K,V fraction is
1 - x_i - y_i - z_i >= 0. `durations` turns them into each unit's affine durations, with every
fixed cost charged (the LP cannot switch a fixed cost off with its work: with the lane on,
every offloaded unit pays the lane's fixed part, so the scheduler also plans with it off and
keeps the faster); `lanes.walk` on the pulp backend turns each max of the schedule into a
variable; the objective minimises the step.
"""
from __future__ import annotations

import tempfile
import time
import warnings

import pulp

from kvc.errors import KvcError
from kvc.planner.lanes import LpOps, Step, walk

TIE_BREAK = 1e-6  # ms per layer kept resident: far below any step difference the LP weighs


def durations(c, ctx, x, z, wc, resident, *, look: int, chunks: int, m: int,
              streams, y=None) -> Step:
    """The step's units with the LP's durations (c: cost.LayerCosts) at per-layer contexts
    `ctx` (the cached tokens each layer reads, sizes.layer_contexts): A, K, R affine in x_i,
    z_i (and y_i); C, D, W as the LP charges them. x, z, wc:
    per layer (pulp expressions or numbers); `streams` per layer: its weight copy is on the
    copy stream (a constant or variable one). `y` (None: no CPU lane): per layer the fraction
    of its tokens the CPU attends to; every offloaded unit then has a CPU part P, its fixed
    cost charged, and its GPU attention reads the rest. Numbers in, numbers out: the test
    evaluates the LP's own solution with the walk."""
    A, K, R, C, D, W, P, off, st = ([] for _ in range(9))
    for u in range(len(resident) * m):
        i, s = u // m, ctx[u // m]
        o = not resident[i]
        cpu = (c.cpu_per_tok * s) * y[i] + c.cpu_fixed if o and y is not None else None
        A.append((c.act_per_tok * s) * x[i] + chunks * c.copy_fixed if o else 0.0)
        if cpu is None:
            K.append((c.kv_per_tok * s) * (1 - x[i] - z[i]) + 2 * c.copy_fixed if o else 0.0)
            C.append(c.layer_fixed + c.attn_per_tok * (s + 1))
        else:
            K.append((c.kv_per_tok * s) * (1 - x[i] - y[i] - z[i]) + 2 * c.copy_fixed)
            C.append(c.layer_fixed + c.attn_per_tok * (s + 1) - (c.attn_per_tok * s) * y[i])
        R.append((c.rec_per_tok * s) * x[i] + chunks * c.rec_chunk_fixed if o else 0.0)
        D.append(c.writeback if o else 0.0)
        P.append(0.0 if cpu is None else cpu)
        first = u % m == 0
        W.append(wc[i] if first and streams[i] else 0.0)
        off.append(o)
        st.append(bool(first and streams[i]))
    lane = [o and y is not None for o in off] if y is not None else []
    # a token split (c.merge > 0): every offloaded unit merges the ranks' partials
    merge = [c.merge if o else 0.0 for o in off] if c.merge else []
    return Step(A, K, R, C, D, W, m * c.head, off, st, lookahead=look, act_chunks=chunks,
                weight_lag=m + 1, back=c.layer_back, front=c.layer_front,
                P=P if lane else [], cpu=lane, merge=merge)


def solve(c, L: int, s, *, look: int, chunks: int, resident, deadline: float,
          mem_budget: tuple[float, float] | None = None, wcopy=None, with_step: bool = False,
          m: int = 1, weight_budget: tuple[float, float, float] | None = None,
          fixed_x: float | None = None, with_values: bool = False, cpu=None):
    """One decode step at context s (an int, or per layer the cached tokens it reads) as an
    LP. Returns (l_i/s, z_i, w_i) per layer; with `cpu` set, (l_i/s, z_i, w_i, c_i/s).

    `wcopy[i]`: a constant weight copy (ms) for layer i, or, with `weight_budget = (full copy
    ms, layer GB, GB for layer weights and two slots)`, a variable one w_i * full, under
    sum((1 - w_i) * layer GB) + 2 * slot <= budget, slot >= w_i * layer GB; every layer then
    streams structurally (its copies wait for its weight slot). `mem_budget = (free GB, GB per
    layer)`: sum(z_i) * per layer <= free. `fixed_x`: every x_i fixed (full_offload: 0).
    `with_step`: also return the step T. `with_values`: also return the solved Step (durations
    at the solution), which `lanes.walk` evaluates to T. `cpu` (None: no CPU lane): "free", a
    CPU fraction y_i per offloaded layer with x_i + y_i + z_i <= 1, or a number, every y_i
    fixed to it (schedule.cpu_attention_fraction); with the lane, every offloaded unit pays
    its fixed part.
    """
    ctx = list(s) if isinstance(s, (list, tuple)) else [s] * L
    prob = pulp.LpProblem("kvc_step", pulp.LpMinimize)
    x, z, w, wc, streams = _variables(prob, L, resident, mem_budget, weight_budget, wcopy, fixed_x)
    y = None if cpu is None else _cpu_variables(prob, resident, x, z, cpu)
    kw = dict(look=look, chunks=chunks, m=m, streams=streams)
    T = walk(LpOps(prob), durations(c, ctx, x, z, wc, resident, y=y, **kw))
    # the step is flat in how much of the cache stays resident over a range of z (the link
    # or the GPU binds, not the bytes): among equal steps, keep the most on the GPU (fewer
    # bytes over PCIe, and a vertex that does not depend on the solver's pivoting order)
    prob += T - TIE_BREAK * pulp.lpSum(z) if mem_budget else T
    if mem_budget:
        free, per_layer = mem_budget
        prob += pulp.lpSum(z) * per_layer <= free, "gpu_memory"
    _run(prob, deadline, max(ctx, default=0))
    xs, zs, ws = ([min(1.0, max(0.0, _value(v))) for v in vs] for vs in (x, z, w))
    ys = None if y is None else [min(1.0, max(0.0, _value(v))) for v in y]
    out = (xs, zs, ws) if ys is None else (xs, zs, ws, ys)
    if with_step:
        out = (*out, _value(T))
    if with_values:
        out = (*out, durations(c, ctx, xs, zs, [_value(e) for e in wc], resident, y=ys, **kw))
    return out


def _cpu_variables(prob, resident, x, z, cpu):
    """y per layer: the fraction the CPU lane attends to (0 for a resident layer), with the
    layer's fractions summing to at most 1 (the K,V copied are what is left)."""
    y = []
    for i, r in enumerate(resident):
        if r:
            y.append(0.0)
            continue
        y.append(prob.add_variable(f"y{i}", 0, 1) if cpu == "free" else float(cpu))
        if not all(isinstance(v, (int, float)) for v in (x[i], y[i], z[i])):
            prob += x[i] + y[i] + z[i] <= 1
    return y


def _variables(prob, L, resident, mem_budget, weight_budget, wcopy, fixed_x):
    """x, z, w per layer, each layer's weight copy (ms) and whether it streams."""
    V = prob.add_variable  # pulp 3.3+: variables belong to their problem
    x, z, w = [], [], []
    for i in range(L):
        if resident[i]:
            x.append(0.0)
            z.append(0.0)
        else:
            x.append(V(f"x{i}", 0, 1) if fixed_x is None else float(fixed_x))
            z.append(V(f"z{i}", 0, 1) if mem_budget else 0.0)
            if mem_budget and fixed_x is None:
                prob += x[i] + z[i] <= 1
        if weight_budget:
            w.append(V(f"w{i}", 0, 1))
    if not weight_budget:
        wc = list(wcopy or [0.0] * L)
        return x, z, w, wc, [bool(v) for v in wc]
    full, layer_gb, room = weight_budget
    slot = V("slot", 0)
    for i in range(L):
        prob += slot >= layer_gb * w[i]
    prob += pulp.lpSum(layer_gb * (1 - w[i]) for i in range(L)) + 2 * slot <= room, "weights"
    return x, z, w, [full * w[i] for i in range(L)], [True] * L


def _value(e) -> float:
    return float(e) if isinstance(e, (int, float)) else float(pulp.value(e) or 0.0)


def _run(prob, deadline: float, s) -> None:
    left = max(0.5, deadline - time.perf_counter())
    with warnings.catch_warnings():
        # PULP_CBC_CMD (the CBC bundled with pulp) is deprecated for pulp 4, which drops the
        # bundle; until then it is the one solver every install has
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=left)
        # pulp writes the problem and CBC's solution as files: in a folder of this solve's
        # own, removed whatever happens (Ctrl-C left .mps/.sol files in /tmp)
        with tempfile.TemporaryDirectory(prefix="kvc-lp-") as tmp:
            solver.tmpDir = tmp
            status = prob.solve(solver)
    if pulp.LpStatus[status] != "Optimal" or prob.sol_status != pulp.LpSolutionOptimal:
        what = pulp.LpStatus[status]
        sol = pulp.LpSolution.get(prob.sol_status, str(prob.sol_status))
        hint = ("the GPU memory constraint (resident layers or weights vs gpu_mem_gb)"
                if what == "Infeasible"
                else f"no optimal solution within schedule.solver_time_limit_s ({left:.1f} s left)")
        raise KvcError(f"scheduler LP at context {s} failed: status {what}, solution {sol}; "
                       f"binding: {hint}")
