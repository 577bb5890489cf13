"""What `kvc plan` prints: the chosen split per layer at one context, the predicted decode
step and where its time goes, and every other mode's prediction beside it.

Both forms come from the same dict (`plan_json`), so the text never says something the JSON
does not. Both take the PlanRequest that `kvc compile` plans from, so `kvc plan` shows the
plan a compile with the same overrides builds.
"""
from __future__ import annotations

from kvc.config import LIMITS
from kvc.errors import KvcError
from kvc.hardware import HardwareConfig, per_rank
from kvc.ir.modes import NAMES as MODES
from kvc.ir.request import PlanRequest
from kvc.models.spec import ModelSpec
from kvc.planner import cost
from kvc.planner.scheduler import host_memory_gb, make_plan, predict


def plan_json(spec: ModelSpec, hw: HardwareConfig, req: PlanRequest,
              context: int | None = None) -> dict:
    # several GPUs: everything below is one rank's (its rows, its share of the host)
    batch_size, prompt_len, gen_len, dtype = req.rank_batch, req.prompt_len, req.gen_len, req.dtype
    mode, micro_batches, ranks = req.mode, req.micro_batches, req.world_size
    rank_hw = per_rank(hw, ranks)
    s = prompt_len if context is None else int(context)
    if s < 1 or (req.max_context is not None and s > req.max_context):
        raise KvcError(f"--context {s}: the plan covers contexts 1..{req.max_context or 'max_context'}"
                       " (workload.max_context)")
    plan = make_plan(spec, hw, req)
    first, last = _served(plan)
    if not _covers(plan, s) or not first <= s <= last:
        raise KvcError(f"--context {s}: the plan covers contexts {first}..{last} "
                       f"(workload.max_context; {plan.notes.get('max_context', last)})")
    pred = predict(spec, hw, plan, s, batch_size, dtype)
    p = cost.dtype_bytes(dtype)
    layers = []
    shares = plan.context_shares
    for i in range(spec.num_layers):  # a layer's micro-batches share its split: show the first
        u = plan.layer_units(i)[0]
        res = plan.resident[u]
        if shares > 1:  # a token split: the largest rank's share of the tokens the layer reads
            n = -(-spec.cached_tokens(i, s) // shares)
            c, l = 0, min(plan.recompute_tokens(u, n), n)
            kv = 0 if res else n - l
        else:
            c = plan.cpu_tokens(u, spec.cached_tokens(i, s), s)  # the oldest it reads, on the CPU
            l = min(plan.recompute_tokens(u, s), s - c)
            kv = 0 if res else s - l - c
        layers.append({
            "layer": i, "recompute_tokens": l, "cpu_tokens": c, "kv_tokens": kv,
            "gpu_tokens": s if res else 0,
            "act_bytes": int(cost.act_bytes(spec, batch_size, l, p)),
            "kv_bytes": int(cost.kv_bytes(spec, batch_size, kv, p)),
        })
    modes = {}
    for m in MODES:
        if m == mode:
            modes[m] = {"predicted_step_ms": pred["predicted_step_ms"]}
            continue
        try:
            # a forced fraction is an experiment on the chosen mode; the others are solved
            other = make_plan(spec, hw, req.but(mode=m, recompute_fraction=None,
                                                cpu_attention_fraction=None))
        except KvcError as e:
            modes[m] = {"predicted_step_ms": None, "infeasible": str(e)}
            continue
        if not _covers(other, s):  # its own default max_context is shorter (its memory)
            modes[m] = {"predicted_step_ms": None, "infeasible": f"its plan serves contexts "
                        f"{_served(other)[0]}..{_served(other)[1]}, not {s}"}
            continue
        modes[m] = {"predicted_step_ms": predict(spec, hw, other, s, batch_size, dtype)["predicted_step_ms"]}
    base = pred["predicted_step_ms"]
    for v in modes.values():
        if v["predicted_step_ms"] is not None:
            v["ratio_to_" + mode] = round(v["predicted_step_ms"] / base, 4) if base else None
    return {
        "model": {"num_layers": spec.num_layers, "hidden_size": spec.hidden_size,
                  "kv_width": spec.kv_width, "dtype": dtype},
        "hardware": hw.name,
        "mode": mode, "context": s, "batch_size": req.batch_size, "micro_batches": micro_batches,
        # several GPUs: the layers, bytes, step and memory below are one rank's
        **({"world_size": ranks, "rank_batch": batch_size} if ranks > 1 else {}),
        # a token split: the plan's table is a rank's share of the context (plan.max_context)
        **({"split": "tokens", "share_context": pred["share_context"],
            "share_max_context": plan.max_context} if shares > 1 else {}),
        "prompt_len": prompt_len, "gen_len": gen_len, "max_context": _served(plan)[1],
        "context_range": list(_served(plan)),
        "chunk_tokens": req.chunk_tokens, "act_chunks": plan.act_chunks, "lookahead": plan.lookahead,
        "forced_fraction": plan.forced_fraction,
        "cpu_attention": {"lane": plan.cpu_lane, "threads": plan.cpu_threads,
                          "fraction": plan.cpu_fraction, "gbps": hw.cpu_attn_gbps},
        "weights_streamed": plan.streamed_layers,
        "weight_fractions": [round(f, 4) for f in plan.weights_streamed],
        "layers": layers,
        **pred,
        "modes": modes,
        "memory_gb": plan.notes.get("memory_gb", {}),
        "cpu_pool_gb": round(host_memory_gb(spec, plan, batch_size, dtype), 3),
        "notes": {k: v for k, v in plan.notes.items() if k not in ("memory_gb", "parallel")},
        "plan": plan.to_json(),  # what `kvc compile` with the same config stores
        # one-GPU reports stay as they were
        **({"parallel": _parallel(req, rank_hw, pred, plan)} if ranks > 1 else {}),
    }


def _served(plan) -> tuple[int, int]:
    """(first, last): the whole contexts the plan serves (a token split's table is indexed
    by a rank's share; its notes keep the whole max_context)."""
    if plan.context_shares == 1:
        return plan.context_range
    return 1, plan.notes.get("parallel", {}).get("max_context", plan.pool_context)


def _covers(plan, s: int) -> bool:
    """The plan answers the whole context s (a token split: at its share)."""
    if plan.context_shares == 1:
        return plan.covers(s)
    return s <= _served(plan)[1] and plan.covers(plan.share_context(s))


def _parallel(req: PlanRequest, rank_hw: HardwareConfig, pred: dict, plan=None) -> dict:
    """Several GPUs: the batch split and what one rank was planned with."""
    if plan is not None and plan.context_shares > 1:  # a token split
        return {"world_size": req.world_size, "split": "tokens", "batch_size": req.batch_size,
                "rank_batch": req.rank_batch, "share_context": pred["share_context"],
                "share_max_context": plan.max_context,
                "h2d_gbps": rank_hw.h2d_gbps, "d2h_gbps": rank_hw.d2h_gbps,
                "bidir_gbps": rank_hw.bidir_gbps, "host_link_gbps": rank_hw.host_link_gbps,
                "cpu_mem_gb": round(rank_hw.cpu_mem_gb, 4), "gather_ms": pred["gather_ms"],
                "merge_ms": pred["merge_ms"], "merges_ms": pred["merges_ms"],
                "merged_layers": len(plan.offloaded_units) // plan.micro_batches}
    return {"world_size": req.world_size, "batch_size": req.batch_size,
            "rank_batch": req.rank_batch, "padded_rows": req.rank_batch * req.world_size - req.batch_size,
            "h2d_gbps": rank_hw.h2d_gbps, "d2h_gbps": rank_hw.d2h_gbps,
            "bidir_gbps": rank_hw.bidir_gbps, "host_link_gbps": rank_hw.host_link_gbps,
            "cpu_mem_gb": round(rank_hw.cpu_mem_gb, 4), "gather_ms": pred["gather_ms"]}


def plan_text(spec: ModelSpec, hw: HardwareConfig, req: PlanRequest,
              context: int | None = None) -> str:
    d = plan_json(spec, hw, req, context)
    batch_size, prompt_len, gen_len, dtype = req.batch_size, req.prompt_len, req.gen_len, req.dtype
    mode, micro_batches = req.mode, req.micro_batches
    s = d["context"]
    mb = f" in {micro_batches} micro-batches" if micro_batches > 1 else ""
    par = d.get("parallel")
    tokens = bool(par) and par.get("split") == "tokens"
    if tokens:
        rows = "row" if par["rank_batch"] == 1 else "rows"
        mb = (f" over {par['world_size']} GPUs, a token split"
              + (f" in {micro_batches} micro-batches" if micro_batches > 1 else ""))
    elif par:
        rows = "row" if par["rank_batch"] == 1 else "rows"
        mb = (f" over {par['world_size']} GPUs, {par['rank_batch']} {rows} per rank"
              + (f" ({par['padded_rows']} padding)" if par["padded_rows"] else "")
              + (f" in {micro_batches} micro-batches" if micro_batches > 1 else ""))
    first, last = d["context_range"]
    out = [(f"kvc plan: {mode} on {d['hardware']}, batch {batch_size}{mb}, {dtype}, context {s} "
            f"(workload contexts {prompt_len}..{prompt_len + gen_len}; the plan serves "
            f"{first}..{last})")]
    if par:
        share = (f"the lower of the host's {par['host_link_gbps']:g} GB/s over {par['world_size']} "
                 f"ranks and each GPU's {hw.h2d_gbps:g}" if par["host_link_gbps"] > 0 else
                 f"each GPU's {hw.h2d_gbps:g}: no shared host limit known, hardware.host_link_gbps 0")
    if tokens:
        n = par["world_size"]
        out.append(f"  world size {n}, a token split (parallel.split=tokens, one process per GPU): "
                   f"every rank decodes all {par['rank_batch']} {rows} (weights, dense compute and "
                   f"prefill replicated) and attends to ~1/{n} of each offloaded layer's context, "
                   f"its share: up to {par['share_context']} of the {s} cached tokens, over its own "
                   f"link at H2D {par['h2d_gbps']:g} GB/s ({share}); the table, bytes and step below "
                   f"are one rank's at its share (the table covers shares 1..{par['share_max_context']})")
        out.append(f"  host memory: every rank's pinned pools are a full replica of the cache (every "
                   f"row of every offloaded layer), {d['cpu_pool_gb']:g} GB each, against its share "
                   f"of hardware.cpu_mem_gb = {hw.cpu_mem_gb:g}, {par['cpu_mem_gb']:g} GB")
    elif par:
        out.append(f"  world size {par['world_size']} (a batch split, one process per GPU): each rank "
                   f"decodes {par['rank_batch']} {rows} over its own link at H2D {par['h2d_gbps']:g} "
                   f"GB/s ({share}), with {par['cpu_mem_gb']:g} GB of the "
                   "host's pinned memory; the table, bytes, step and memory below are one rank's")
    if d["forced_fraction"] is not None:
        out.append(f"  forced: l = round({d['forced_fraction']:g} * s) in every offloaded layer")
    lane = d["cpu_attention"]
    if lane["fraction"] is not None:
        out.append(f"  forced: c = round({lane['fraction']:g} * n) of every offloaded layer's n cached "
                   "tokens attended to on the CPU")
    # the CPU column only for a plan with the lane: the table of every other plan stays as it was
    cpu = lane["lane"]
    out.append(f"  {'layer':>5}  {'recompute':>9}" + (f"  {'cpu':>7}" if cpu else "")
               + f"  {'kv':>7}  {'on gpu':>7}  {'act MB':>9}  {'kv MB':>9}")
    for row in _fold(d["layers"]):
        first, last, r = row
        name = f"{first}" if first == last else f"{first}-{last}"
        out.append(f"  {name:>5}  {r['recompute_tokens']:>9}"
                   + (f"  {r['cpu_tokens']:>7}" if cpu else "")
                   + f"  {r['kv_tokens']:>7}  {r['gpu_tokens']:>7}"
                   f"  {r['act_bytes'] / 1e6:>9.2f}  {r['kv_bytes'] / 1e6:>9.2f}")
    if d["weights_streamed"]:
        out.append(f"  weights streamed from CPU: {sum(d['weight_fractions']):.2f} layers' worth, from "
                   f"{len(d['weights_streamed'])} of {spec.num_layers} layers {d['weights_streamed']}")
    tot = d["h2d_bytes"] / 1e6
    out.append(f"  H2D per step: {tot:,.3f} MB")
    step = d["predicted_step_ms"]
    out.append(f"predicted decode step: {step:.3f} ms  (link busy {d['link_busy_ms']:.3f} ms, "
               f"GPU busy {d['gpu_busy_ms']:.3f} ms, GPU idle {d['gpu_idle_ms']:.3f} ms, "
               f"host issues it in {d['host_ms']:.3f} ms)")
    if tokens:
        part = par["rank_batch"] // max(1, micro_batches)
        out.append(f"  of which per offloaded layer the all-gather of the ranks' partial (out, lse) "
                   f"and their log-sum-exp merge: {par['merge_ms']:.3f} ms, x {par['merged_layers']}"
                   f" layers{' x ' + str(micro_batches) + ' micro-batches' if micro_batches > 1 else ''}"
                   f" = {par['merges_ms']:.3f} ms (hardware.collective_us {hw.collective_us:g} + "
                   f"{par['world_size'] - 1} x {part} {'row' if part == 1 else 'rows'} x "
                   f"{spec.num_heads} heads x ({spec.head_dim} + 1) x 4 bytes at collective_gbps "
                   f"{hw.collective_gbps:g}, then the merge), and the token broadcast per step: "
                   f"{par['gather_ms']:.3f} ms")
    elif par:
        out.append(f"  of which the logits all-gather after the step: {par['gather_ms']:.3f} ms "
                   f"(hardware.collective_us {hw.collective_us:g} + {par['world_size'] - 1} x "
                   f"{par['rank_batch']} rows x {spec.vocab_size} logits at collective_gbps "
                   f"{hw.collective_gbps:g})")
    if cpu:
        on = [r["cpu_tokens"] for r in d["layers"] if r["cpu_tokens"]]
        out.append(f"  CPU attention lane: {len(on)} of {spec.num_layers} layers attend to "
                   f"{min(on, default=0)}..{max(on, default=0)} of their oldest tokens on the CPU "
                   f"(busy {d.get('cpu_busy_ms', 0.0):.3f} ms, "
                   f"{lane['threads'] or 'the default number of'} threads, "
                   f"hardware.cpu_attn_gbps = {lane['gbps']:g})")
    if d["host_ms"] >= step:
        out.append("  bound by the host: issuing the step's nodes takes longer than the link and the "
                   "GPU (hardware.host_*_us); a larger batch costs the host nothing more")
    out.append("all modes at this context:")
    for m, v in d["modes"].items():
        mark = " <- chosen" if m == mode else ""
        if v["predicted_step_ms"] is None:
            out.append(f"  {m:<13} infeasible: {v['infeasible']}")
        else:
            out.append(f"  {m:<13} {v['predicted_step_ms']:>10.3f} ms  x{v['ratio_to_' + mode]:.2f}{mark}")
    mem = d["memory_gb"]
    if mem:
        out.append("GPU memory (GB): " + ", ".join(
            f"{k[:-3]} {v:.2f}" for k, v in mem.items() if isinstance(v, float)) +
                   (f" (staging holds {mem['staging_for']})" if "staging_for" in mem else ""))
    pinned = par["cpu_mem_gb"] if par else hw.cpu_mem_gb
    if d["cpu_pool_gb"] > pinned:
        out.append(f"warning: the CPU pools need {d['cpu_pool_gb']:.1f} GB, more than "
                   + (f"a rank's share of hardware.cpu_mem_gb = {hw.cpu_mem_gb:g}, {pinned:g}"
                      if par else f"hardware.cpu_mem_gb = {hw.cpu_mem_gb:g}"))
    for k, v in d["notes"].items():
        out.append(f"note: {k}: {v}")
    return "\n".join(out)


def _fold(layers):
    """Consecutive layers with the same split print as one row."""
    keys = ("recompute_tokens", "cpu_tokens", "kv_tokens", "gpu_tokens")
    rows = []
    for r in layers:
        if rows and all(rows[-1][2][k] == r[k] for k in keys):
            rows[-1][1] = r["layer"]
        else:
            rows.append([r["layer"], r["layer"], r])
    return rows


def search_text(spec: ModelSpec, hw: HardwareConfig, req: PlanRequest, max_batch: int) -> str:
    """`kvc plan --search MAX_BATCH`: the policy search (kvc.planner.scheduler.search_policy) over
    batches 1, 2, 4, ... and multiples of 16 up to max_batch, by 1, 2, 4 or 8 micro-batches,
    each planned by the LP; the best predicted decode throughput per micro-batch count, then
    the overrides that select the winner."""
    from kvc.planner.scheduler import search_policy

    top = LIMITS["batch_size"]
    if not 1 <= max_batch <= top:
        raise KvcError(f"--search {max_batch}: expected the largest batch to try, 1..{top}")
    batches = sorted({b for b in (2 ** k for k in range(max_batch.bit_length())) if b <= max_batch}
                     | set(range(16, max_batch + 1, 16)))
    tried: list[dict] = []
    plan, tps = search_policy(spec, hw, req, batch_sizes=batches, tried=tried)
    out = [(f"kvc plan --search: {req.mode} on {hw.name}, {req.dtype}, prompt {req.prompt_len} + gen "
            f"{req.gen_len}, batches up to {max_batch} ({len(tried)} candidates planned)"
            + (f"; each batch split over parallel.world_size = {req.world_size} GPUs"
               if req.world_size > 1 else ""))]
    out.append(f"  {'micro-batches':>13}  {'best batch':>10}  {'tokens/s (predicted)':>20}  refused")
    for m in sorted({t["micro_batches"] for t in tried}):
        ok = [t for t in tried if t["micro_batches"] == m and "tokens_per_s" in t]
        no = sum(1 for t in tried if t["micro_batches"] == m and "refused" in t)
        best = max(ok, key=lambda t: t["tokens_per_s"]) if ok else None
        out.append(f"  {m:>13}  {best['batch'] if best else '-':>10}  "
                   f"{best['tokens_per_s'] if best else 0:>20.1f}  {no}")
    refusals = [t["refused"] for t in tried if "refused" in t]
    if refusals:
        out.append(f"  largest refused: {refusals[-1]}")
    # several GPUs: the plan is one rank's; the whole batch is the winning candidate's
    whole = plan.batch_size if plan.world_size == 1 else next(
        t["batch"] for t in tried if t.get("tokens_per_s") == tps and t["micro_batches"] == plan.micro_batches)
    ranks = (f" over {plan.world_size} GPUs ({plan.batch_size} rows per rank)"
             if plan.world_size > 1 else "")
    out.append(f"best: batch {whole}{ranks} in {plan.micro_batches} micro-batch(es), "
               f"{tps:.1f} tokens/s predicted: workload.batch_size={whole} "
               f"workload.num_gpu_batches={plan.micro_batches}")
    return "\n".join(out)
