"""`kvc inspect`: what an artifact was compiled for, read from its manifest alone (no weights,
no trace), with the other modes' predictions re-solved for the same machine and workload."""
from __future__ import annotations

from kvc.errors import KvcError


def inspect_text(artifact) -> str:
    from kvc.artifact import read_manifest
    from kvc.config import from_dict
    from kvc.hardware import HardwareConfig
    from kvc.ir.modes import NAMES as MODES
    from kvc.ir.plan import Plan
    from kvc.ir.request import PlanRequest
    from kvc.models.spec import ModelSpec
    from kvc.planner.scheduler import make_plan, predict

    m = read_manifest(artifact)  # every field typed and bounded before anything is solved
    try:
        c, w = m["config"], m["config"]["workload"]
        spec, hw, plan = ModelSpec.from_dict(m["model_spec"]), HardwareConfig(**m["hardware"]), Plan.from_json(m["plan"])
        req = PlanRequest.from_config(from_dict(c, where=f"{artifact}/manifest.json"))
    except (TypeError, KeyError, ValueError) as e:
        raise KvcError(f"{artifact}: damaged manifest ({e}); recompile the artifact") from None
    b, dtype, P, G = w["batch_size"], c["model"]["dtype"], w["prompt_len"], w["gen_len"]
    wt = m["weights"]
    src = (f"preset {wt.get('preset')} (dummy weights, seed {wt.get('seed')}: text is meaningless)"
           if wt["kind"] == "dummy" else f"checkpoint {wt['path']} ({len(wt['sha256'])} files, sha256 "
           "checked at load)")
    measured = ", ".join(f"{k} {v}" for k, v in hw.measured.items()) or "a preset, not measured here"
    off = plan.offloaded_units
    # a token split's table is indexed by a rank's share of the context
    ls = [plan.recompute_tokens(i, plan.share_context(s)) for s in (P, P + G) for i in off]
    served = plan.context_range if plan.context_shares == 1 else \
        (1, plan.notes.get("parallel", {}).get("max_context", plan.pool_context))
    out = [f"kvc inspect: {artifact}",
           (f"  built:    kvc {m.get('kvc_version')}, torch {m.get('torch_version')}, {m.get('created')}, "
            f"format {m['format_version']}, code {m['code_hash'][:12]}"),
           f"  model:    {src}",
           (f"            {spec.model_type}, {spec.num_layers} layers, hidden {spec.hidden_size}, heads "
            f"{spec.num_heads} ({spec.num_kv_heads} KV), vocab {spec.vocab_size}, {dtype}"),
           (f"  workload: batch {b}, prompt {P}, generate {G} (decode contexts {P}..{P + G}); the "
            f"plan serves contexts {served[0]}..{served[1]}"),
           *_parallel(hw, plan, b),
           (f"  machine:  {hw.name} ({hw.device}): H2D {hw.h2d_gbps:g} GB/s, GEMM {hw.gemm_tflops:g} "
            f"TFLOP/s, GPU memory {hw.gpu_mem_gb:g} GB; {measured}"),
           f"  plan:     {plan.mode}, {len(off)}/{plan.num_units} "
           f"{'units (layer x micro-batch)' if plan.micro_batches > 1 else 'layers'} offloaded, lookahead "
           f"{plan.lookahead}, {plan.act_chunks} activation chunk(s), chunk {plan.chunk_tokens} tokens"
           + (f", recomputes {min(ls)}..{max(ls)} tokens per offloaded layer" if ls else "")
           + (f", forced fraction {plan.forced_fraction:g}" if plan.forced_fraction is not None else "")
           + (f", {plan.micro_batches} micro-batches" if plan.micro_batches > 1 else "")
           + (f", weights streamed {sum(plan.weights_streamed):.2f} of {plan.num_layers} layers"
              if plan.streamed_layers else "")]
    out.append("  cpu lane: " + _cpu_lane(spec, hw, plan, P, G))
    pred = predict(spec, hw, plan, P, b, dtype)
    here = pred["predicted_step_ms"]
    gather = (f" (of which the logits all-gather {pred['gather_ms']:.3f} ms)"
              if plan.world_size > 1 else "")
    if plan.context_shares > 1:
        gather = (f" at a rank's share of {pred['share_context']} tokens (of which the ranks' "
                  f"all-gather and merge of their partials {pred['merges_ms']:.3f} ms, "
                  f"{pred['merge_ms']:.3f} per offloaded layer, and the token broadcast "
                  f"{pred['gather_ms']:.3f} ms)")
    out.append(f"predicted decode step at context {P}: {here:.3f} ms{gather}; speed-up of this "
               "plan over:")
    for mode in MODES:
        if mode == plan.mode:
            continue
        try:
            other = make_plan(spec, hw, req.but(mode=mode, recompute_fraction=None,
                                                cpu_attention_fraction=None))
        except KvcError as e:
            out.append(f"  {mode:<13} infeasible on this machine: {e}")
            continue
        t = predict(spec, hw, other, P, b, dtype)["predicted_step_ms"]
        out.append(f"  {mode:<13} {t:>10.3f} ms   x{t / here:.2f}")
    return "\n".join(out)


def _parallel(hw, plan, b: int) -> list[str]:
    """Several GPUs (issue 18): the batch split and the link a rank was planned with; nothing
    for a one-GPU plan."""
    if plan.world_size == 1:
        return []
    from kvc.hardware import per_rank

    rank = per_rank(hw, plan.world_size)
    limit = f"{hw.host_link_gbps:g} GB/s" if hw.host_link_gbps > 0 else "unknown"
    if plan.context_shares > 1:
        return [f"  parallel: world size {plan.world_size}, a token split (parallel.split=tokens; "
                f"one process per GPU, torchrun): every rank decodes all {plan.batch_size} "
                f"row{'s' if plan.batch_size > 1 else ''} and attends to ~1/{plan.world_size} of "
                f"each offloaded layer's context over its own link at H2D {rank.h2d_gbps:g} GB/s "
                f"(host limit {limit}), the ranks' partials merged per layer; every rank's host "
                f"pools are a full replica of the cache"]
    return [f"  parallel: world size {plan.world_size}, a row split (parallel.split=rows; one "
            f"process per GPU, torchrun), {plan.batch_size} row{'s' if plan.batch_size > 1 else ''}"
            f" per rank of the batch of {b}, each over its own link at H2D {rank.h2d_gbps:g} GB/s "
            f"(host limit {limit})"]


def _cpu_lane(spec, hw, plan, P: int, G: int) -> str:
    """Whether the plan attends to part of the offloaded cache on the CPU (issue 17), and how
    much of it over the workload's contexts."""
    if not plan.cpu_lane:
        why = ("hardware.cpu_attn_gbps is 0 (no lane measured)" if hw.cpu_attn_gbps <= 0
               else "the LP found it does not pay, or schedule.cpu_attention is off")
        return f"none ({why})"
    share = []
    for s in (P, P + G):
        for u in plan.offloaded_units:
            n = spec.cached_tokens(plan.unit_layer(u), s)
            share.append((plan.cpu_tokens(u, n, s), n))
    c = [a for a, _ in share]
    frac = [a / n for a, n in share if n]
    how = (f"forced fraction {plan.cpu_fraction:g}" if plan.cpu_fraction is not None
           else f"chosen by the LP at {plan.cpu_gbps:g} GB/s, "
                "none while the steps run faster without it"
           if plan.cpu_gbps > 0 else "chosen by the LP")
    threads = plan.cpu_threads or "the default number of"
    return (f"on ({how}): {min(c)}..{max(c)} of the oldest cached tokens per offloaded layer at "
            f"contexts {P}..{P + G} ({min(frac, default=0):.0%}..{max(frac, default=0):.0%}), "
            f"{threads} threads, at {hw.cpu_attn_gbps:g} GB/s")
