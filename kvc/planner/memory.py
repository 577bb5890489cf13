"""GPU and host memory of a plan: what the budget holds (weights, staging, workspace, resident
caches, pinned pools), the checks that refuse what does not fit, and the weight placement."""
from __future__ import annotations

import numpy as np

from kvc.dtypes import dtype_bytes
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig
from kvc.ir.modes import Mode
from kvc.ir.plan import Plan, rounded_fraction, weights_for_fraction
from kvc.ir.request import PlanRequest
from kvc.models import layer_param_sizes
from kvc.models.spec import ModelSpec
from kvc.planner.lp import solve
from kvc.planner.sizes import (GB, act_bytes, kv_bytes, layer_contexts, layer_weight_bytes,
                               longest_context, weight_bytes)


def workspace_bytes(spec: ModelSpec, b: int, s_max: int, p: int) -> int:
    """Transient activations of one step: MLP intermediates, fp32 logits, attention scores."""
    inter = b * (4 * spec.hidden_size + 2 * spec.intermediate_size) * p
    n = longest_context(spec, s_max)  # attention scores over the longest window read
    return inter + b * spec.vocab_size * 4 + b * spec.num_heads * (n + 1) * 4


def staging_bytes(spec: ModelSpec, b: int, s_max: int, p: int, buffers: int, with_act: bool) -> int:
    """GPU staging for offloaded layers: per buffer, K,V of all s tokens (transferred tail and
    recomputed head land in the same buffer, so attention reads one tensor), plus the
    activations of the recomputed head when the plan recomputes anything."""
    n = longest_context(spec, s_max)  # a sliding-window layer stages its window only
    per = kv_bytes(spec, b, n + 1, p) + (act_bytes(spec, b, n, p) if with_act else 0)
    return buffers * per


def memory_terms(spec: ModelSpec, hw: HardwareConfig, b: int, s_max: int, dtype: str,
                 buffers: int, with_act: bool, streamed_layers=0, micro_batches: int = 1) -> dict:
    """GB figures for the GPU budget; `free_gb` is what is left for resident KV caches.

    `streamed_layers`: how many whole layers keep their weights in pinned CPU memory, or per
    layer the fraction of its weight bytes that does. Those bytes come off the resident
    weights, and two GPU weight slots, each the size of the largest streamed part (one slot
    if only one layer streams), come on as `weight_slots_gb`. The keys appear only when
    something streams. With micro-batches, staging and the step's transients are per
    micro-batch of b / micro_batches (the logits and hidden states of all of them live until
    the step ends); a resident layer's cache holds the whole batch (`layer_kv_gb`).
    """
    p = dtype_bytes(dtype)
    lw = layer_weight_bytes(spec, p)
    if np.ndim(streamed_layers):
        frac = np.clip(np.asarray(streamed_layers, dtype=float), 0.0, 1.0)
    else:
        n = max(0, min(spec.num_layers, int(streamed_layers)))
        frac = np.array([1.0] * n)
    bm = b // max(1, micro_batches)
    rest = (b - bm) * (spec.vocab_size * 4 + 2 * spec.hidden_size * p)
    t = {
        "weights_gb": (weight_bytes(spec, p) - float(frac.sum()) * lw) / GB,
        "staging_gb": staging_bytes(spec, bm, s_max, p, buffers, with_act) / GB if buffers else 0.0,
        "workspace_gb": (workspace_bytes(spec, bm, s_max, p) + rest) / GB,
        "margin_gb": hw.mem_margin_gb,
        "layer_kv_gb": kv_bytes(spec, b, s_max + 1, p) / GB,
    }
    t["free_gb"] = hw.gpu_mem_gb - t["weights_gb"] - t["staging_gb"] - t["workspace_gb"] - t["margin_gb"]
    n = int(np.count_nonzero(frac))
    if n:
        t["weights_streamed"] = round(float(frac.sum()), 4)
        t["weight_slots_gb"] = min(n, 2) * float(frac.max()) * lw / GB
        t["free_gb"] -= t["weight_slots_gb"]
    return t


def host_pool_bytes(spec: ModelSpec, b: int, max_tokens: int, p: int, offloaded: int,
                    act_rows: int, kv_lo: int = 0) -> int:
    """What OffloadedCache pins, for each offloaded layer: activations of the recomputed rows
    [0, act_rows), K,V of the rows read back as K,V, [kv_lo, max_tokens) (Plan.min_kv_row)."""
    return offloaded * (kv_bytes(spec, b, max_tokens - kv_lo, p) + act_bytes(spec, b, act_rows, p))


# --- the plan's memory: host pools, checks, weight placement --------------------------------------

def host_memory_gb(spec: ModelSpec, plan: Plan, b: int, dtype: str) -> float:
    """Host memory the runtime allocates for the plan by default: the pinned offloaded
    units' cache pools (each of b / micro_batches sequences) for contexts up to
    plan.max_context, trimmed to the rows the plan reads back from prompts of at least
    prompt_len (pool_rows; untrimmed when the plan has a CPU attention lane), and the
    streamed weights; with the CPU lane, its copies of the rows it reads (lane_copy_bytes). A
    token split: one rank's pools, a full replica (every row of the whole context,
    Plan.pool_context: K,V and activations of all)."""
    s_max = plan.max_context
    p = dtype_bytes(dtype)
    off = [u for u, r in enumerate(plan.resident) if not r]
    # with the CPU attention lane the runtime keeps every row of every pool (it attends in
    # place to the oldest rows, which the trimming would drop): K,V and activations of all;
    # so does a token split (a rank's share moves through the whole context)
    if plan.context_shares > 1:
        act_rows = kv_rows = plan.pool_context
    else:
        act_rows, kv_rows = (s_max, s_max) if plan.cpu_lane else pool_rows(spec, plan, s_max)
    pools = host_pool_bytes(spec, b // plan.micro_batches, kv_rows, p, len(off), act_rows)
    pools += lane_copy_bytes(spec, plan, b // plan.micro_batches, p)
    return (pools + sum(plan.weights_streamed) * layer_weight_bytes(spec, p)) / GB


def lane_copy_bytes(spec: ModelSpec, plan: Plan, b: int, p: int) -> int:
    """The CPU attention lane's head-major copies of the rows it reads (kvc.runtime.cpu_attention:
    host memory, not pinned): per offloaded unit its tokens [0, lo + c), at most the largest
    c any context gives (a sliding-window unit's lo moves with s: every row, to be safe)."""
    if not plan.cpu_lane:
        return 0
    s_max = plan.max_context
    most = (round(plan.cpu_fraction * s_max) if plan.cpu_fraction is not None
            else max((c for row in plan.cpu for c in row), default=0))
    rows = [s_max if spec.window(plan.unit_layer(u)) is not None else min(s_max, most)
            for u, r in enumerate(plan.resident) if not r]
    return sum(kv_bytes(spec, b, n, p) for n in rows)


def pool_rows(spec: ModelSpec, plan: Plan, s_max: int) -> tuple[int, int]:
    """(activation rows, K,V rows) of every offloaded unit's pools: the most any one needs
    (the runtime gives all units one pool shape). A unit attending to every row keeps
    activations of the recomputed rows [0, max l) and K,V of [min l, s_max); a sliding-window
    unit, which reads the last n = cached_tokens rows and recomputes the first l of them,
    keeps the rows its contexts read, which move with s."""
    full = (min(s_max, plan.max_recompute_tokens(s_max)),
            s_max - max(0, min(s_max, plan.min_kv_row(s_max))))
    rows = [(0, 0)]
    for u, r in enumerate(plan.resident):
        w = None if r else spec.window(plan.unit_layer(u))
        if not r:
            rows.append(full if w is None else _window_pool_rows(plan, u, w, s_max))
    return max(a for a, _ in rows), max(k for _, k in rows)


def _window_pool_rows(plan: Plan, unit: int, w: int, s_max: int) -> tuple[int, int]:
    """(activation rows, K,V rows) a sliding-window unit's pools keep over the contexts
    [prompt_len, s_max): activations of [min lo, max(lo + l)), K,V of [min(lo + l), s_max)."""
    if plan.forced_fraction is None and not plan.recompute:
        return s_max, s_max  # a hand-made plan without a table: keep every row
    s = np.array([x for x in range(plan.prompt_len, s_max) if plan.covers(x)], dtype=np.int64)
    n = np.clip(s, 0, w - 1)
    lo = s - n
    l = np.minimum(np.asarray(plan.recompute_table(s, [unit])[0], dtype=np.int64), n)
    rec, read = l > 0, lo + l < s
    a_lo = int(lo[rec].min()) if rec.any() else 0
    a_hi = int((lo + l)[rec].max()) if rec.any() else 0
    k_lo = int((lo + l)[read].min()) if read.any() else s_max
    return a_hi - min(a_lo, a_hi), s_max - k_lo


def check_host_memory(spec: ModelSpec, hw: HardwareConfig, plan: Plan, b: int, dtype: str) -> None:
    """The pinned pools must fit `hardware.cpu_mem_gb`: refused here, before any allocation."""
    need = host_memory_gb(spec, plan, b, dtype)
    if need > hw.cpu_mem_gb and plan.context_shares > 1:
        raise KvcError(
            f"{plan.mode}: with parallel.split = tokens every rank's pinned CPU pools are a full "
            f"replica of the cache, {need:.1f} GB, more than its share of hardware.cpu_mem_gb "
            f"over parallel.world_size = {plan.world_size}, {hw.cpu_mem_gb:g} GB, at contexts up to "
            f"{plan.pool_context}; lower workload.max_context or the batch, use fewer ranks, or "
            "raise cpu_mem_gb if the machine has the memory")
    if need > hw.cpu_mem_gb:
        what = "the pinned CPU pools and the CPU lane's copies" if plan.cpu_lane else "the pinned CPU pools"
        raise KvcError(
            f"{plan.mode}: {what} need {need:.1f} GB, more than hardware.cpu_mem_gb = "
            f"{hw.cpu_mem_gb:g}, at workload.max_context = {plan.max_context}; lower "
            "workload.batch_size or the context, or raise cpu_mem_gb if the machine has the memory")


def default_max_context(spec: ModelSpec, hw: HardwareConfig, req: PlanRequest,
                        shares: int = 1) -> tuple[int, str]:
    """workload.max_context null: the model's maximum positions, capped at the longest
    context whose memory fits at the request's batch, and what capped it. Growing the context
    must cost the workload nothing the memory had: the GPU keeps what it held at the
    workload's longest context (weights unstreamed if they fit there, activation staging if
    it fit there; in a mode that keeps every layer's cache on the GPU, the whole cache), and
    the host holds every unit's pools in full (K,V and, where recomputed, activations of
    every row: an upper bound of what the plan's trimmed pools take). Never below the
    workload's own longest context: there the planner's own checks say what does not fit.
    `shares` > 1 (a token split; `req` the whole workload, `hw` a rank's): the whole context,
    the GPU holding a rank's share of it (ceil(s / shares) + 1) and the host a full replica."""
    lo, hi = req.workload_end, spec.max_positions
    if hi <= lo:
        return lo, "the workload (prompt_len + gen_len)"
    gpu, host = _context_fits(spec, hw, req, shares)
    if gpu(hi) and host(hi):
        return hi, "the model's maximum positions"
    if not (gpu(lo) and host(lo)):
        return lo, "the workload (prompt_len + gen_len): memory holds no longer context"
    a, b = lo, hi  # gpu(a) and host(a); not at b
    while b - a > 1:
        mid = (a + b) // 2
        a, b = (mid, b) if gpu(mid) and host(mid) else (a, mid)
    return a, ("GPU memory" if not gpu(b) else "host memory (hardware.cpu_mem_gb)")


def _context_fits(spec, hw, req: PlanRequest, shares: int = 1):
    """(GPU fits at s, host fits at s): two predicates over contexts, for default_max_context.
    `shares` > 1, a token split: the GPU at a rank's share of s, the host a full replica."""
    mode, b, m, dtype, L = req.schedule, req.batch_size, req.micro_batches, req.dtype, spec.num_layers
    p, lo = dtype_bytes(dtype), req.workload_end
    if shares > 1:
        def share(s):
            return -(-s // shares) + 1
        gpu_share = _context_fits(spec, hw, req.but(prompt_len=share(lo) - 1, gen_len=1))[0]
        weights = (0.0 if req.weight_stream_fraction is None else  # the planner may stream more
                   float(np.sum(weights_for_fraction(L, req.weight_stream_fraction)))
                   * layer_weight_bytes(spec, p))

        def replica(s):  # every row of the whole context: K,V and activations, every layer
            rows = (share(s) - 1) * shares
            return host_pool_bytes(spec, b // m, rows, p, L * m, rows) + weights <= hw.cpu_mem_gb * GB
        return (lambda s: gpu_share(share(s))), replica
    forced = () if req.weight_stream_fraction is None else \
        tuple(float(x) for x in weights_for_fraction(L, req.weight_stream_fraction))
    if not mode.offloads:
        def gpu(s):
            t = memory_terms(spec, hw, b, s, dtype, 0, False, forced, m)
            return t["layer_kv_gb"] * L <= t["free_gb"]
        return gpu, lambda s: True
    buffers = mode.overlap(req.act_chunks)["lookahead"] + 1
    streamed = forced or (() if memory_terms(spec, hw, b, lo, dtype, buffers, False, 0, m)["free_gb"] >= 0
                          else L)
    with_act = (mode.recomputes and req.recompute_fraction != 0
                and memory_terms(spec, hw, b, lo, dtype, buffers, True, streamed, m)["free_gb"] >= 0)
    n_streamed = float(np.sum(streamed)) if np.ndim(streamed) else float(streamed)
    weights = n_streamed * layer_weight_bytes(spec, p)
    bm = b // m

    def gpu(s):
        return memory_terms(spec, hw, b, s, dtype, buffers, with_act, streamed, m)["free_gb"] >= 0

    def host(s):
        pools = host_pool_bytes(spec, bm, s, p, L * m, s if with_act else 0)
        return pools + weights <= hw.cpu_mem_gb * GB
    return gpu, host


def check_memory(spec, hw, b, s_max, dtype, mode: Mode, buffers, with_act, streamed=(),
                 micro_batches: int = 1) -> dict:
    """The GPU budget's terms for the plan (memory_terms), or a KvcError naming what does not
    fit. An offloading mode whose activation staging does not fit plans without recompute
    (`recompute_disabled`); `staging_for` says what the staging holds."""
    m = micro_batches
    if not mode.offloads:
        t = memory_terms(spec, hw, b, s_max, dtype, 0, False, streamed, m)
        need = t["layer_kv_gb"] * spec.num_layers - t["free_gb"]
        if need > 0:
            raise KvcError(
                f"{mode.name} does not fit: needs {need:.1f} GB more than hardware.gpu_mem_gb = "
                f"{hw.gpu_mem_gb:g} (weights {t['weights_gb']:.1f} GB + KV cache "
                f"{t['layer_kv_gb'] * spec.num_layers:.1f} GB + workspace {t['workspace_gb']:.1f} GB"
                f" + margin {t['margin_gb']:g} GB); use an offloading mode")
        return t
    bare = {**memory_terms(spec, hw, b, s_max, dtype, buffers, False, streamed, m),
            "staging_for": "kv"}
    if bare["free_gb"] < 0:
        raise KvcError(
            f"{mode.name}: GPU memory is {-bare['free_gb']:.2f} GB short of streaming even one "
            f"layer: weights {bare['weights_gb']:.2f} GB + staging {bare['staging_gb']:.2f} GB + "
            f"workspace {bare['workspace_gb']:.2f} GB + margin {bare['margin_gb']:g} GB > "
            f"hardware.gpu_mem_gb = {hw.gpu_mem_gb:g}; lower workload.batch_size or the context")
    if not with_act:
        return bare
    t = memory_terms(spec, hw, b, s_max, dtype, buffers, True, streamed, m)
    if t["free_gb"] < 0:
        bare["recompute_disabled"] = (f"activation staging needs {-t['free_gb']:.2f} GB more "
                                      f"GPU memory; planned without recompute")
        return bare
    return {**t, "staging_for": "kv+act"}


def place_weights(c, spec, hw, b, s_max, dtype, mode: Mode, buffers, look, chunks, m,
                  recompute_fraction, deadline) -> tuple[float, ...]:
    """Weight placement: () when every layer's weights fit next to the cache's staging;
    otherwise per layer the fraction of its weights streamed from pinned CPU memory, as the LP
    at the longest context chooses it under the GPU budget (with the split of that context
    free, or fixed by the mode), each rounded up to whole parameters (largest first).
    A mode that does not offload never streams on its own (weight_stream_fraction can force
    it). Where even streaming every layer does not fit, the error names the shortfall."""
    L = spec.num_layers
    args = (spec, hw, b, s_max, dtype, buffers, False)
    if not mode.offloads or memory_terms(*args, 0, m)["free_gb"] >= 0:
        return ()
    every = memory_terms(*args, L, m)
    if every["free_gb"] < 0:
        raise KvcError(
            f"{mode.name}: GPU memory is {-every['free_gb']:.2f} GB short of streaming even one "
            f"layer, with every layer's weights streamed from CPU: resident weights "
            f"{every['weights_gb']:.2f} GB + weight slots {every['weight_slots_gb']:.2f} GB + "
            f"staging {every['staging_gb']:.2f} GB + workspace {every['workspace_gb']:.2f} GB + "
            f"margin {every['margin_gb']:g} GB > hardware.gpu_mem_gb = {hw.gpu_mem_gb:g}; "
            "lower workload.batch_size or the context")
    layer_gb = layer_weight_bytes(spec, dtype_bytes(dtype)) / GB
    # what is left for layer weights and their two slots with every layer streamed
    room = every["free_gb"] + every["weight_slots_gb"] + L * layer_gb
    fixed = None if mode.recomputes and recompute_fraction is None else (
        0.0 if recompute_fraction is None else recompute_fraction)
    w = solve(c, L, layer_contexts(spec, s_max).tolist(), look=look, chunks=chunks, resident=(False,) * L, deadline=deadline,
              m=m, weight_budget=(c.weight_copy, layer_gb, room), fixed_x=fixed)[2]
    sizes = layer_param_sizes(spec)
    out = [rounded_fraction(sizes, f) if f > 1e-6 else 0.0 for f in w]
    # rounding up streams at least what the LP chose; a vertex at exactly the budget may
    # still be a hair short after rounding: stream the next layer whole until it fits
    for i in sorted(range(L), key=lambda i: -out[i]):
        if memory_terms(*args, out, m)["free_gb"] >= 0:
            break
        out[i] = 1.0
    return tuple(out)
