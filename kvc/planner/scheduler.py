"""The scheduler: a linear program (pulp + CBC, kvc.planner.lp) that splits each layer's
context between recomputed-from-activations, transferred-as-K,V and kept-on-GPU, for every
decode step.

How a plan is made (`make_plan`):
1. Memory (kvc.planner.memory): weights, staging buffers, workspace and a margin come off
   `gpu_mem_gb`; what is left may hold whole resident layers. When the weights do not fit
   next to the staging, the LP at the longest context, each layer's streamed weight fraction
   a variable under the budget, places them (`place_weights`; `schedule.weight_stream_fraction`
   forces whole layers, spread evenly). Too little even to stream one layer is an error.
2. A mode that keeps layers resident: one LP at the longest context, with a free per-layer
   GPU fraction z_i under the memory budget, says which layers to keep resident (the largest
   z_i, rounded down to whole layers: the runtime keeps a layer's cache entirely on one side).
3. The plan covers every context 1..max_context (workload.max_context; null: the model's
   maximum positions as memory allows, kvc.planner.memory.default_max_context). With that
   residency fixed, the LP at context s is the same LP at every s but for constants that are
   affine in s (durations are affine in the tokens l_i = x_i s and in s): its optimal step
   T(s) is convex and piecewise linear in s, and so can l_i(s) be. So a few contexts are
   solved (`_buckets`: one chunk, the longest, then geometric midpoints only where T is not
   yet linear between two solved neighbours) and l_i interpolates linearly in s between them,
   which is the LP's own optimum wherever T is linear; l is rounded to `chunk_tokens`.
4. The rounded plan is evaluated at every context (kvc.planner.evaluate: the LP's walk on
   arrays, with fixed costs only where paid); where recomputing nothing is predicted faster,
   that context recomputes nothing. So pipelined is never predicted slower than
   full_offload, and grouped-query models, whose activations are bigger than their K,V,
   recompute nothing: the LP's slope says so, no special case.
5. The CPU attention lane (issue 17; schedule.cpu_attention auto, a machine with
   hardware.cpu_attn_gbps > 0, a mode that offloads): the same buckets are solved again with
   a CPU fraction y_i per offloaded layer (y_i + z_i <= 1; the lane's fixed part charged to
   every offloaded unit, since an LP cannot switch it off with its work), twice where the
   mode recomputes: nothing recomputed (x_i = 0), and x_i free beside y_i; c_i interpolated
   and rounded like l_i. The candidate predicted fastest over the workload's decode contexts
   is kept only if it is predicted no slower than the plan without the lane at every one of
   them, so auto is never predicted slower than off there (`_with_cpu_lane`); the table
   without the lane stays beside it as Plan.bare, which the runtime's guard runs in the
   steps it times without the lane (kvc.runtime.lane_guard). A plan with CPU tokens keeps
   every host pool row (memory.host_memory_gb); where that does not fit the
   host, the plan goes without the lane.
6. Several GPUs (issue 18, parallel.world_size N > 1; a batch split): each rank decodes
   ceil(batch / N) rows over its own link with the weights replicated, so the plan is ONE
   rank's: made for the rank's rows on the machine a rank sees (kvc.hardware.per_rank: its
   share of the host's summed link rate, of its pinned memory and of the CPU lane's threads
   and rate), its steps plus the logits all-gather after each one
   (kvc.planner.evaluate.gather_ms, added where the step is formed).
7. A token split (parallel.split tokens, N > 1; a batch too small to split by rows): every
   rank decodes every row (weights, dense compute and prefill replicated) and attends to
   its share of each offloaded layer's cached tokens, 1/N of them, over its own link. The
   plan is ONE rank's over its SHARE of the context: the 1-GPU plan at the share (its table
   indexed by the share m, covering 1..ceil(max_context / N) + 1; prompt_len and gen_len the
   workload's shares), the whole batch's dense compute, per_rank(hw, N)'s link, and each
   offloaded unit's all-gather and log-sum-exp merge of the ranks' partials on the compute
   lane after its attention (cost.merge_ms, in lanes.walk, so the LP sees it), plus a token
   broadcast per step. Every layer's cache is offloaded (a resident layer would not be
   split) and there is no CPU attention lane. The host pools are a full replica on every
   rank: checked at the whole context against cpu_mem_gb / N.
`predicted_step_ms` is reported for the workload's contexts prompt_len..prompt_len + gen_len;
the table is stored as runs of equal rows (kvc.ir.plan).
The scheduler asks the request's Mode what it may decide (offloads, recomputes,
keeps_resident, lookahead, chunked), never its name.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from kvc.errors import KvcError
from kvc.hardware import HardwareConfig, per_rank
from kvc.ir.plan import Plan, forced_plan, weights_for_fraction
from kvc.ir.request import PlanRequest
from kvc.models.spec import ModelSpec
from kvc.planner import cost
from kvc.planner.evaluate import cpu_table, evaluate, evaluate_arrays, gather_ms
from kvc.planner.lp import solve as _solve
from kvc.planner.memory import (check_host_memory, check_memory, default_max_context,
                                place_weights)
# what callers import from here
from kvc.planner.evaluate import predict, step_terms  # noqa: F401
from kvc.planner.memory import host_memory_gb

MAX_BUCKETS = 7  # LP solves per plan at most (contexts where the split is solved)
LINEAR_TOL = 2e-3  # T(s) this close (relative) to its chord counts as linear on the interval


def make_plan(spec: ModelSpec, hw: HardwareConfig, req: PlanRequest) -> Plan:
    """The plan for `req`. In a chunked mode (pipelined) `req.act_chunks` is the most chunks
    the activation copy may be split into: more chunks overlap recompute with the copy better
    but cost the host more nodes to issue, so the plan with the lower predicted generation
    time wins (1 or all). `req.micro_batches`: the block schedule's micro-batches per step;
    `req.resident_cache` false: no layer keeps its cache on the GPU; `req.cuda_graphs`: the
    runtime replays the step's static runs as CUDA graphs on a GPU, which the host lane counts.
    `req.max_context` None: kvc.planner.memory.default_max_context. `req.world_size` N > 1:
    the plan of one rank (its rank_batch rows, on per_rank(hw, N)), with world_size N."""
    t0 = time.perf_counter()
    ranks = req.world_size
    shares = ranks if req.tokens else 1
    whole = req
    if ranks > 1:
        hw, req = per_rank(hw, ranks), req.but(batch_size=req.rank_batch, world_size=1, split="rows")
    why = "workload.max_context"
    if req.max_context is None:
        n, why = default_max_context(spec, hw, req, shares)
        req = req.but(max_context=n)
    if shares > 1:  # a token split: a rank's share of the workload and of every context
        full = req.max_context
        req = share_request(req, shares)
    plan = _best_chunks(spec, hw, req, ranks, shares)
    if plan.cpu_lane and req.cpu_attention_fraction is None \
            and host_memory_gb(spec, plan, req.batch_size, req.dtype) > hw.cpu_mem_gb:
        # the lane keeps every pool row: where that does not fit, plan without it
        need = host_memory_gb(spec, plan, req.batch_size, req.dtype)
        plan = _best_chunks(spec, hw, req.but(cpu_attention="off"), ranks)
        plan = replace(plan, notes={**plan.notes, "cpu_attention": (
            f"off: the lane's pools (every row kept) need {need:.1f} GB of pinned memory, more "
            f"than hardware.cpu_mem_gb = {hw.cpu_mem_gb:g}")})
    check_host_memory(spec, hw, plan, req.batch_size, req.dtype)
    notes = {**plan.notes, "max_context": f"{req.max_context} ({why})"}
    if shares > 1:
        return replace(plan, notes=_token_notes(spec, hw, whole, req, plan, notes, full, why, t0))
    if ranks > 1:  # what one rank was planned with (one-GPU plans' notes stay as they were)
        notes["parallel"] = {
            "world_size": ranks, "rank_batch": req.batch_size, **_rank_machine(hw),
            "gather_ms": round(gather_ms(spec, hw, ranks, req.batch_size, req.dtype), 6)}
    if "solve_s" in notes:
        notes["solve_s"] = round(time.perf_counter() - t0, 4)  # both plans, end to end
    return replace(plan, notes=notes)


def _rank_machine(hw) -> dict:
    """What one rank was planned with (per_rank's links and shares of the host's memory and
    of its CPU lane)."""
    lane = {"cpu_attn_gbps": round(hw.cpu_attn_gbps, 4), "cpu_attn_threads": hw.cpu_attn_threads} \
        if hw.cpu_attn_gbps > 0 else {}
    return {"h2d_gbps": hw.h2d_gbps, "d2h_gbps": hw.d2h_gbps, "bidir_gbps": hw.bidir_gbps,
            "host_link_gbps": hw.host_link_gbps, "cpu_mem_gb": round(hw.cpu_mem_gb, 4), **lane}


def share_request(req: PlanRequest, shares: int) -> PlanRequest:
    """A token split's rank request (`req` one GPU's, the whole workload with its
    max_context): the largest share of the workload's contexts, ceil(prompt_len / N)..
    ceil((prompt_len + gen_len) / N), and a table up to ceil(max_context / N) + 1 (a rank's
    share m looked up by the runtime is at most ceil(s / N)); every layer's cache offloaded."""
    first, end = -(-req.prompt_len // shares), -(-req.workload_end // shares)
    return req.but(prompt_len=first, gen_len=end - first, resident_cache=False,
                   max_context=-(-req.max_context // shares) + 1)


def _token_notes(spec, hw, whole: PlanRequest, req: PlanRequest, plan: Plan, notes: dict,
                 full: int, why: str, t0: float) -> dict:
    """A token split's notes: the whole workload as given, what a rank was planned with."""
    n = plan.world_size
    c = cost.layer_costs(spec, hw, req.batch_size // req.micro_batches, req.dtype, shares=n)
    notes = {**notes, "max_context": (f"{full} ({why}); a rank's share of it: up to "
                                      f"{plan.max_context} tokens")}
    if whole.resident_cache and whole.schedule.keeps_resident:
        notes["resident_cache"] = ("off: parallel.split = tokens offloads and splits every "
                                   "layer's cache (a resident layer would not be split)")
    notes["parallel"] = {
        "world_size": n, "split": "tokens", "rank_batch": req.batch_size,
        "prompt_len": whole.prompt_len, "gen_len": whole.gen_len, "max_context": full,
        **_rank_machine(hw), "merge_ms": round(c.merge, 6),
        "gather_ms": round(gather_ms(spec, hw, n, req.batch_size, req.dtype, "tokens"), 6)}
    if "solve_s" in notes:
        notes["solve_s"] = round(time.perf_counter() - t0, 4)
    return notes


def _best_chunks(spec, hw, req: PlanRequest, ranks: int = 1, shares: int = 1) -> Plan:
    """The plan with req.act_chunks chunks, or with one where that is predicted faster.
    `ranks`: the world size the plan is one rank of (`req` and `hw` are the rank's);
    `shares`: a token split's (req is then a rank's share of the workload)."""
    plan = _make_plan(spec, hw, req, ranks, shares)
    if req.schedule.chunked and req.recompute_fraction is None and req.act_chunks > 1:
        single = _make_plan(spec, hw, req.but(act_chunks=1), ranks, shares)
        if sum(single.predicted_step_ms) < sum(plan.predicted_step_ms):
            plan = single
    return plan


@dataclass
class _Job:
    """One plan being made: the request, its machine and costs, the memory it has."""
    spec: ModelSpec
    hw: HardwareConfig
    req: PlanRequest
    c: cost.LayerCosts
    streamed: tuple[float, ...]  # per layer, the fraction of its weights streamed
    mem: dict  # memory.check_memory's terms
    notes: dict
    deadline: float
    # the CPU attention lane: None (none), "free" (the LP decides) or a forced fraction
    lane: str | float | None = None
    ranks: int = 1  # the world size the plan is one rank of (req and hw are the rank's)
    shares: int = 1  # a token split's shares (ranks); 1: none

    @property
    def L(self) -> int:
        return self.spec.num_layers

    @property
    def overlap(self) -> dict:
        return self.req.schedule.overlap(self.req.act_chunks)

    @property
    def ctx(self) -> np.ndarray:
        """The table's contexts: every one from 1 to max_context."""
        return np.arange(1, self.req.max_context + 1)

    @property
    def workload(self) -> slice:
        """Where the workload's contexts prompt_len..prompt_len + gen_len lie in `ctx`."""
        return slice(self.req.prompt_len - 1, self.req.workload_end)

    def contexts(self, s: int) -> list[int]:
        """Per layer, the cached tokens it reads at context s: what the LP prices it at."""
        return cost.layer_contexts(self.spec, s, self.shares).tolist()

    def lp(self) -> dict:
        """The keywords every LP of this plan takes."""
        wcopy = list(self.streamed) and [w * self.c.weight_copy for w in self.streamed]
        return dict(look=self.overlap["lookahead"], chunks=self.overlap["act_chunks"],
                    deadline=self.deadline, wcopy=wcopy, m=self.req.micro_batches)

    def plan(self, resident) -> Plan:
        r, m = self.req, self.req.micro_batches
        return Plan(mode=r.mode, num_layers=self.L, prompt_len=r.prompt_len, gen_len=r.gen_len,
                    chunk_tokens=r.chunk_tokens, batch_size=r.batch_size, dtype=r.dtype,
                    weights_streamed=self.streamed, micro_batches=m, cuda_graphs=r.cuda_graphs,
                    resident=tuple(cost.per_unit(resident, m).tolist()), recompute=(),
                    max_context=r.max_context, world_size=self.ranks,
                    split="tokens" if self.shares > 1 else "rows", **self.overlap)

    def steps(self, plan: Plan, recompute: np.ndarray, cpu: np.ndarray | None = None) -> np.ndarray:
        """Predicted step per context for per-layer l and CPU tokens ([layers, contexts];
        cpu None: the plan's own, e.g. its forced fraction)."""
        m = plan.micro_batches
        l = cost.per_unit(recompute, m)
        c = cost.per_unit(cpu, m) if cpu is not None else \
            (cpu_table(self.spec, plan, self.ctx) if plan.cpu_lane else None)
        return evaluate_arrays(self.spec, self.hw, plan, self.ctx, l, self.req.batch_size,
                               self.req.dtype, c)[0]


def _make_plan(spec: ModelSpec, hw: HardwareConfig, req: PlanRequest, ranks: int = 1,
               shares: int = 1) -> Plan:
    t0 = time.perf_counter()
    job = _prepare(spec, hw, req, t0 + req.time_limit_s, shares)
    job.ranks = ranks
    if req.recompute_fraction is not None:
        return _forced(job)
    resident = _residency(job)
    plan = job.plan(resident)
    if isinstance(job.lane, float):  # schedule.cpu_attention_fraction: c forced, l the LP's
        plan = replace(plan, cpu_fraction=job.lane, cpu_threads=hw.cpu_attn_threads)
        recompute = _fractions(job, resident, cpu=job.lane)
    else:
        recompute = _fractions(job, resident)
    recompute, steps = _drop_slower_recompute(job, plan, recompute)
    cpu, bare = np.zeros_like(recompute), None
    if job.lane == "free":
        without = recompute
        recompute, cpu, steps = _with_cpu_lane(job, plan, resident, recompute, steps)
        # the plan without the lane, for the runtime's guard (lane_guard): a unit whose
        # graph has no recompute nodes (l 0 at every context with the lane) copies all
        bare = np.where(recompute.any(axis=1, keepdims=True), without, 0) if cpu.any() else None
    if cpu.any():  # what the runtime measures its lane against
        plan = replace(plan, cpu_threads=hw.cpu_attn_threads, cpu_gbps=float(hw.cpu_attn_gbps))
    if shares > 1:
        recompute, steps = _window_shares(job, plan, recompute, steps)
    plan, steps, cpu = _more_resident(job, plan, recompute, steps, cpu)
    job.notes["solve_s"] = round(time.perf_counter() - t0, 4)
    m = req.micro_batches
    units = cost.per_unit(recompute, m)
    lane = bool(cpu.any())  # (_more_resident may have made every lane unit resident)
    tables = [units, cost.per_unit(cpu, m)] + ([cost.per_unit(bare, m)] if lane else [])
    starts, rows = _runs(np.concatenate(tables), first=int(job.ctx[0]))
    n = len(units)
    cpu_rows = tuple(r[n:2 * n] for r in rows) if lane else ()
    bare_rows = tuple(r[2 * n:] for r in rows) if lane else ()
    return replace(plan, recompute=tuple(r[:n] for r in rows), recompute_from=starts,
                   cpu=cpu_rows, bare=bare_rows, predicted_step_ms=_ms(steps[job.workload]),
                   notes=job.notes)


def _runs(l: np.ndarray, first: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """l per unit and context ([units, contexts], contexts first, first + 1, ...) as runs of
    equal rows: (the first context of each run, its row)."""
    if l.shape[1] == 0:
        return (), ()
    change = np.ones(l.shape[1], dtype=bool)
    change[1:] = (l[:, 1:] != l[:, :-1]).any(axis=0)
    idx = np.flatnonzero(change)
    return tuple((idx + first).tolist()), tuple(map(tuple, l[:, idx].T.tolist()))


def _prepare(spec, hw, req: PlanRequest, deadline: float, shares: int = 1) -> _Job:
    """Costs, weight placement and the memory check (a token split: at a rank's share, with
    the merge of the ranks' partials in every offloaded unit's costs)."""
    sched, m, L = req.schedule, req.micro_batches, spec.num_layers
    ov = sched.overlap(req.act_chunks)
    buffers = ov["lookahead"] + 1 if sched.offloads else 0
    mem_args = (spec, hw, req.batch_size, req.max_context, req.dtype, sched)
    c = cost.layer_costs(spec, hw, req.batch_size // m, req.dtype, offloaded=sched.offloads,
                         shares=shares)
    if req.weight_stream_fraction is not None:
        streamed = tuple(float(w) for w in weights_for_fraction(L, req.weight_stream_fraction))
    else:
        streamed = place_weights(c, *mem_args, buffers, ov["lookahead"], ov["act_chunks"], m,
                                 req.recompute_fraction, deadline)
    if any(streamed):
        c = cost.layer_costs(spec, hw, req.batch_size // m, req.dtype, offloaded=True, shares=shares)
    with_act = sched.recomputes and req.recompute_fraction != 0
    mem = check_memory(*mem_args, buffers=buffers, with_act=with_act, streamed=streamed,
                       micro_batches=m)
    notes: dict = {"memory_gb": _round(mem)}
    if any(streamed) and req.weight_stream_fraction is None:
        notes["weights"] = (f"{sum(streamed):.2f} of {L} layers' weights stream from CPU: the LP's "
                            "per-layer fractions, rounded up to whole parameters")
    return _Job(spec, hw, req, c, streamed, mem, notes, deadline, _lane(hw, req, notes, shares),
                shares=shares)


def _lane(hw, req: PlanRequest, notes: dict, shares: int = 1) -> str | float | None:
    """What the plan may do with the CPU attention lane: None, "free" (the LP decides) or
    the forced fraction. A note says why not where the machine has a lane."""
    if shares > 1:  # a token split (a forced fraction was refused by the request)
        if hw.cpu_attn_gbps > 0 and req.schedule.offloads:
            notes["cpu_attention"] = "off: not planned for parallel.split = tokens"
        return None
    if req.cpu_attention_fraction is not None:
        if not req.cpu_lane_allowed:
            return None
        if hw.cpu_attn_gbps <= 0:
            notes["cpu_attention"] = ("forced on a machine without a measured lane "
                                      "(hardware.cpu_attn_gbps 0): its time is not predicted")
        return float(req.cpu_attention_fraction)
    if hw.cpu_attn_gbps <= 0 or not req.schedule.offloads:
        return None
    if not req.cpu_lane_allowed:
        notes["cpu_attention"] = "off (schedule.cpu_attention)"
        return None
    return "free"


def _forced(job: _Job) -> Plan:
    """schedule.recompute_fraction: l = round(fraction * s) everywhere, no LP."""
    r = job.req
    plan = forced_plan(r.mode, job.L, r.prompt_len, r.gen_len, r.chunk_tokens,
                       r.recompute_fraction, r.act_chunks, micro_batches=r.micro_batches,
                       max_context=r.max_context,
                       cpu_fraction=job.lane if isinstance(job.lane, float) else None)
    plan = replace(plan, batch_size=r.batch_size, dtype=r.dtype, weights_streamed=job.streamed,
                   cuda_graphs=r.cuda_graphs, world_size=job.ranks,
                   split="tokens" if job.shares > 1 else "rows",
                   cpu_threads=job.hw.cpu_attn_threads if plan.cpu_lane else 0)
    steps = evaluate(job.spec, job.hw, plan, np.asarray(r.workload_contexts), r.batch_size, r.dtype)[0]
    return replace(plan, predicted_step_ms=_ms(steps), notes={**job.notes, "forced": True})


def _residency(job: _Job) -> tuple[bool, ...]:
    """Per layer: its whole cache on the GPU. A mode that keeps layers resident asks the LP
    at the longest context, with a kept-on-GPU fraction z_i per layer under the budget."""
    sched, mem, r, L = job.req.schedule, job.mem, job.req, job.L
    resident = (not sched.offloads,) * L
    if not (sched.recomputes and sched.keeps_resident and r.resident_cache) \
            or mem.get("recompute_disabled") or mem["free_gb"] < mem["layer_kv_gb"]:
        return resident
    z = _solve(job.c, L, job.contexts(r.max_context), resident=resident,
               mem_budget=(mem["free_gb"], mem["layer_kv_gb"]), **job.lp())[1]
    n_res = min(L, int(math.floor(sum(z) + 1e-6)), int(mem["free_gb"] // mem["layer_kv_gb"]))
    keep = sorted(range(L), key=lambda i: (-round(z[i], 6), i))[:n_res]
    return tuple(i in keep for i in range(L))


def _fractions(job: _Job, resident, cpu=None, paired: bool = False):
    """l per layer and context ([layers, contexts]): the LP's split at a few contexts
    (`_buckets`), interpolated linearly in s and rounded to whole chunks. `cpu` "free": the
    LP with the CPU lane, (l, c): l = 0 (the lane alone) unless `paired` (the LP picks both);
    a number: the lane's forced fraction, l at most n - c."""
    r, ctx = job.req, job.ctx
    recompute = np.zeros((job.L, len(ctx)), dtype=np.int64)
    n = cost.layer_contexts(job.spec, ctx, job.shares)
    fixed_x = 0.0 if cpu == "free" and not paired else None
    if not r.schedule.recomputes or job.mem.get("recompute_disabled"):
        if job.mem.get("recompute_disabled"):
            job.notes["recompute_disabled"] = job.mem["recompute_disabled"]
        if cpu != "free":
            return recompute
    if all(resident):  # everything fits on the GPU: nothing left to split
        return recompute if cpu != "free" else (recompute, recompute.copy())
    reps, tokens = _buckets(job, resident, cpu, fixed_x)
    if cpu == "free":
        job.notes["cpu_buckets"] = reps
        c = _round_to_chunks(tokens[1], reps, ctx, n, r.chunk_tokens)
        return _round_to_chunks(tokens[0], reps, ctx, n - c, r.chunk_tokens), c
    job.notes["buckets"] = reps
    if cpu is not None:  # the forced lane's c = round(f * n), as Plan.cpu_tokens
        return _round_to_chunks(tokens, reps, ctx, n - np.rint(cpu * n).astype(np.int64),
                                r.chunk_tokens)
    return _round_to_chunks(tokens, reps, ctx, n, r.chunk_tokens)


def _buckets(job: _Job, resident, cpu=None, fixed_x=None) -> tuple[list[int], np.ndarray]:
    """The contexts the LP is solved at and its tokens l_i there ([layers, contexts]; with
    `cpu` "free", [2, layers, contexts]: l_i and c_i).

    Between two solved contexts a and b, the tokens interpolated linearly are feasible at
    every s in [a, b] (the LP's constraints are affine in (l, s)) with the step T's chord as
    their objective; T(s) is convex, so they are optimal wherever T is linear. Solve one
    chunk and the longest context, then the geometric midpoint of an interval (the kinks
    crowd at short contexts, where the fixed costs weigh); an interval whose midpoint T lies
    on its chord (within LINEAR_TOL) is linear throughout (a convex function meeting its
    chord inside an interval equals it there; within a tolerance, the chord is off by at
    most twice the midpoint's gap), so only the others are split again, up to MAX_BUCKETS."""
    r = job.req
    lo, hi = max(1, min(r.chunk_tokens, r.max_context)), r.max_context
    solved = {s: _solve_at(job, resident, s, cpu, fixed_x) for s in dict.fromkeys((lo, hi))}
    todo = [(lo, hi)] if hi > lo else []
    while todo and len(solved) < MAX_BUCKETS:
        a, b = todo.pop(0)  # widest first: breadth-first in log s
        mid = round(math.sqrt(a * b))
        if not a < mid < b or b - a < 2 * r.chunk_tokens:
            continue  # l moves in whole chunks: a finer split cannot change it
        solved[mid] = _solve_at(job, resident, mid, cpu, fixed_x)
        ta, tm, tb = solved[a][1], solved[mid][1], solved[b][1]
        chord = ta + (tb - ta) * (mid - a) / (b - a)
        if chord - tm > LINEAR_TOL * max(tm, 1e-9):
            todo += [(a, mid), (mid, b)]
    reps = sorted(solved)
    return reps, np.stack([solved[s][0] for s in reps], axis=-1)


def _solve_at(job: _Job, resident, s: int, cpu=None, fixed_x=None) -> tuple[np.ndarray, float]:
    """The LP at context s with the residency fixed: (tokens l_i per layer, its step T);
    with `cpu` "free", ([l_i, c_i], T)."""
    n = np.asarray(job.contexts(s), dtype=float)
    out = _solve(job.c, job.L, n.tolist(), resident=resident, with_step=True, cpu=cpu,
                 fixed_x=fixed_x, **job.lp())
    if cpu == "free":
        x, _, _, y, T = out
        return np.stack([np.asarray(x) * n, np.asarray(y) * n]), float(T)
    return np.asarray(out[0]) * n, float(out[-1])


def _drop_slower_recompute(job: _Job, plan: Plan, recompute: np.ndarray):
    """The LP charged per-copy / per-chunk fixed costs to every layer, and rounding moved l:
    wherever recomputing nothing is predicted faster, recompute nothing. (l, steps)."""
    steps = job.steps(plan, recompute)
    if recompute.any():
        steps0 = job.steps(plan, np.zeros_like(recompute))
        worse = steps0 < steps
        recompute[:, worse] = 0
        steps = np.where(worse, steps0, steps)
    return recompute, steps


def _with_cpu_lane(job: _Job, plan: Plan, resident, recompute, steps):
    """The LP again with the CPU lane, twice where the mode recomputes: the lane alone
    (nothing recomputed) and the lane beside recompute (the LP picks l and c together).
    For each, per context, the lane's split where it is predicted faster than the same
    candidate's plan without it; then ONE plan for every context: the candidate predicted
    fastest over the workload's decode contexts (workload.prompt_len .. + gen_len), kept
    only if it is predicted no slower than the plan without the lane at every one of them
    (at other contexts the artifact serves it may be), its steps predicted for the table as
    it will run (a unit that recomputes at any context carries its recompute nodes at every
    step). (l, c, steps), [layers, contexts] each.

    While the host waited for each unit's CPU part in its attention node (before the flag
    poll, kvc.runtime.flagwait), auto never paired the lane with recompute: the host issued
    the next unit's recompute only after the wait, so OPT-6.7B b32 s1024 with l and c both
    > 0 ran at 250 ms against 125 predicted (H200, 2026-11-29). With the poll the walk's
    order is the runtime's: the recompute is queued behind the merge, the CPU part beside
    it. Measured with the poll (H200, 2026-11-29, session 12): OPT-6.7B's paired plans ran
    137.7-156.7 ms against 158-160 without the lane, none stalled, up to 30% over their
    prediction: the host's CPU rate inside the steps, below the profiler's (kvc.runtime.lane_guard)."""
    r = job.req
    decode = (job.ctx >= r.prompt_len) & (job.ctx < r.prompt_len + max(1, r.gen_len))
    if not decode.any():
        decode = np.ones(len(job.ctx), dtype=bool)
    none = np.zeros_like(recompute)
    pairs = r.schedule.recomputes and not job.mem.get("recompute_disabled")
    best = None
    for paired in (False, True) if pairs else (False,):
        l_on, c_on = _fractions(job, resident, cpu="free", paired=paired)
        if not c_on.any():
            continue
        # where the lane does not pay: the lane alone falls back to recomputing nothing (its
        # graph has no recompute nodes), the pair to the plan without the lane
        l_off = recompute if paired else none
        bare = steps if paired else job.steps(plan, none)
        better = job.steps(plan, l_on, c_on) < bare
        l, c = np.where(better, l_on, l_off), np.where(better, c_on, 0)
        mixed = job.steps(plan, l, c)  # the table as it will run (host nodes included)
        if better[decode].any() and np.all(mixed[decode] <= steps[decode]) and (
                best is None or mixed[decode].mean() < best[2][decode].mean()):
            best = (l, c, mixed)
            how = "beside recompute" if l.any() else "nothing recomputed"
    if best is None:
        job.notes["cpu_attention"] = "auto: off, the lane's plan was predicted no faster"
        return recompute, none, steps
    on = int((best[1] > 0).any(axis=0).sum())
    job.notes["cpu_attention"] = f"auto: on at {on} of {len(job.ctx)} contexts, {how}"
    return best


def _window_shares(job: _Job, plan: Plan, recompute: np.ndarray, steps):
    """A token split: the runtime reads a sliding-window unit's l at its own share m, which
    stops growing at ceil((w - 1) / N) (sizes.layer_contexts), while the table's row m serves
    the other layers' share m: a window layer's l at every longer share is its l at that
    cap, so the table answers the same whichever share it is asked at. (l, steps)."""
    n = cost.layer_contexts(job.spec, job.ctx, job.shares)
    changed = False
    for i in range(job.L):
        if job.spec.window(i) is None:
            continue
        cap = int(n[i].max())
        k = int(np.searchsorted(job.ctx, cap))  # the column of share `cap`
        if k < len(job.ctx) - 1 and (recompute[i, k + 1:] != recompute[i, k]).any():
            recompute[i, k + 1:] = recompute[i, k]
            changed = True
    return recompute, (job.steps(plan, recompute) if changed else steps)


def _more_resident(job: _Job, plan: Plan, recompute: np.ndarray, steps, cpu):
    """Nothing recomputed (e.g. grouped-query models): the activation staging is not needed,
    and its memory holds more resident layers, which never slow a step. (plan, steps, cpu)."""
    r, L = job.req, job.L
    if not (r.schedule.keeps_resident and r.resident_cache and not recompute.any()
            and "act" in job.mem.get("staging_for", "")):
        return plan, steps, cpu
    bare = cost.memory_terms(job.spec, job.hw, r.batch_size, r.max_context, r.dtype,
                             plan.lookahead + 1, False, job.streamed, r.micro_batches)
    resident = plan.resident[::r.micro_batches]
    n_max = min(L, int(max(0.0, bare["free_gb"]) // bare["layer_kv_gb"]))
    extra = [i for i in range(L) if not resident[i]][:max(0, n_max - sum(resident))]
    if not extra:
        return plan, steps, cpu
    lane = {f: getattr(plan, f) for f in ("cpu_fraction", "cpu_threads", "cpu_gbps")}
    plan = replace(job.plan(tuple(res or i in extra for i, res in enumerate(resident))), **lane)
    cpu = np.where(np.array(plan.resident[::r.micro_batches])[:, None], 0, cpu)
    job.notes["memory_gb"] = _round({**bare, "staging_for": "kv"})
    return plan, job.steps(plan, recompute, cpu if cpu.any() else None), cpu


def _ms(steps) -> tuple[float, ...]:
    return tuple(np.round(np.asarray(steps, dtype=float), 6).tolist())


def _round_to_chunks(tokens: np.ndarray, reps: list[int], ctx: np.ndarray, n: np.ndarray,
                     chunk: int) -> np.ndarray:
    """Per-layer tokens at each context, linear in s between the solved contexts `reps` (a
    fixed fraction of s below the first and of n above the last), then l in whole chunks of
    the n[i, j] tokens layer i reads at context j (n <= s: a sliding-window layer's window)."""
    s = ctx.astype(float)
    y = np.stack([np.interp(s, reps, row) for row in tokens]) if len(reps) > 1 \
        else tokens.repeat(len(ctx), 1)
    below = s < reps[0]
    if below.any():  # the first solved context's fraction, as the old log-interpolation did
        y[:, below] = tokens[:, :1] / reps[0] * s[below]
    l = np.rint(np.minimum(y, n) / chunk).astype(np.int64) * chunk
    return np.minimum(l, (n // chunk) * chunk)


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
    candidate: batch, micro_batches, and tokens_per_s or the refusal.

    Several GPUs (req.world_size N > 1): `batch_sizes` are whole batches, split over the N
    ranks; a batch with fewer rows than ranks, or whose share per rank the micro-batches do
    not divide, is skipped; the plans are one rank's (Plan.batch_size its share) and the
    throughput is the whole batch's, b * gen_len / sum of one rank's steps."""
    best, best_tps, last = None, -1.0, None
    ranks = req.world_size
    tokens = req.tokens  # a token split: every rank decodes the whole batch
    for b in sorted(set(batch_sizes)):
        if b < ranks and not tokens:
            continue
        for m in sorted(set(micro_batches)):
            if (b if tokens else -(-b // ranks)) % m:
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
        raise last or KvcError("search_policy: no batch size to try" + (
            f" (each needs at least parallel.world_size = {ranks} rows)" if ranks > 1 else ""))
    return best, best_tps
