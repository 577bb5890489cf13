"""Issue 6's throughput rows: weights and KV cache in pinned CPU memory, each mode at the
batch and micro-batch count its policy search predicts fastest."""
from __future__ import annotations

import time
from functools import partial

import torch

from kvc.api import assemble, resolve
from kvc.compiler.lowering import lower
from kvc.config import load_config
from kvc.errors import KvcError
from kvc.ir.request import PlanRequest
from kvc.models import build_model
from kvc.planner.scheduler import host_memory_gb, predict, search_policy
from kvc.runtime.weights import place_streamed

from . import env
from .env import GEN_LEN, HOST_GB, TP_BATCHES, TP_MICRO, TP_PROMPT, free_memory
from .plan import get_spec
from .timing import timed


def throughput_point(name, gpu_gb, hw_name, log=print,
                     modes=("full_offload", "kvpr", "pipelined")) -> list[dict]:
    """FlexGen's setting (issue 6): every layer's weights and KV cache in pinned CPU memory,
    prompt TP_PROMPT, gen GEN_LEN. Each mode runs at the (batch, micro-batches) its policy
    search (kvc.planner.scheduler.search_policy: the LP inside) predicts fastest within the GPU budget
    and HOST_GB of host memory. Timed: generate(n=1) (prefill) and generate(n=GEN_LEN), once
    each after a warm-up; decode throughput = batch * (GEN_LEN - 1) / (their difference), total
    throughput = batch * GEN_LEN / the whole generate."""
    spec = get_spec(name)
    card_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if env.DEVICE == "cuda" else 64.0
    budget = gpu_gb or round(card_gb, 1)
    overrides = [f"hardware={hw_name}", f"hardware.gpu_mem_gb={budget}", f"hardware.cpu_mem_gb={HOST_GB}",
                 *env.HOST_OVERRIDES]
    hw = resolve(load_config({"model": {"preset": name}}, overrides)).hardware
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        try:
            req = PlanRequest(batch_size=1, prompt_len=TP_PROMPT, gen_len=GEN_LEN, dtype=env.DTYPE_NAME,
                              max_context=TP_PROMPT + GEN_LEN,
                              mode=mode, weight_stream_fraction=1.0, resident_cache=False,
                              cuda_graphs=env.GRAPHS[-1])
            plan, _pred_tps = search_policy(spec, hw, req, batch_sizes=TP_BATCHES,
                                           micro_batches=TP_MICRO)
        except KvcError as e:
            log(f"{name} throughput gpu={budget} {mode}: nothing fits ({e})")
            continue
        b, m = plan.batch_size, plan.micro_batches
        search_s = time.perf_counter() - t0
        # streamed parameters are drawn straight into the pinned pool: the GPU holds only the
        # resident weights and the weight slots, never the whole model
        model = build_model(spec, env.DEVICE, env.DTYPE, seed=0, place=place_streamed(plan, env.DEVICE))
        cm = assemble(lower(model, plan), plan, spec, env.DTYPE, torch.device(env.DEVICE))
        del model  # the compiled model holds the parameters, now in its pinned weight pool
        free_memory()
        ids = torch.randint(0, spec.vocab_size, (b, TP_PROMPT), device=env.DEVICE)
        try:
            cm.generate(ids, 3)  # warm-up: pools, kernels, CUDA graph capture
            # the bound method, not a closure over `cm` (deleted below at the end of each pass)
            pre = timed(partial(cm.generate, ids, 1))
            whole = timed(partial(cm.generate, ids, GEN_LEN))
        except torch.OutOfMemoryError as e:
            log(f"{name} throughput {mode} b={b} m={m}: out of memory ({str(e)[:80]})")
            cm.close()
            del cm
            free_memory()
            continue
        decode = whole - pre
        steps = GEN_LEN - 1
        pred_ms = sum(plan.predicted_step_ms[:steps]) / steps
        moved = predict(spec, hw, plan, TP_PROMPT + steps // 2, b, env.DTYPE_NAME)["h2d_bytes"]
        rows.append({
            "model": name, "batch": b, "context": TP_PROMPT, "setting": "throughput", "mode": mode,
            "cuda_graphs": plan.cuda_graphs,
            "micro_batches": m, "gpu_mem_gb_budget": budget, "cpu_mem_gb_budget": HOST_GB,
            "decode_ms_per_token": round(decode / steps * 1e3, 3), "predicted_ms": round(pred_ms, 3),
            "decode_tokens_per_s": round(b * steps / decode, 2),
            "total_tokens_per_s": round(b * GEN_LEN / whole, 2),
            "predicted_decode_tokens_per_s": round(b * 1e3 / pred_ms, 2),
            "prefill_s": round(pre, 3), "bytes_per_step": int(moved),
            "host_pinned_gb": round(host_memory_gb(spec, plan, b, env.DTYPE_NAME), 2),
            "weights_streamed": round(sum(plan.weights_streamed), 3),
            "recompute_fraction_mid": round(sum(plan.recompute_tokens(u, TP_PROMPT + 16) for u in range(plan.num_units))
                                            / max(1, plan.num_units * (TP_PROMPT + 16)), 3),
            "search_s": round(search_s, 2),
        })
        r = rows[-1]
        log(f"{name} throughput gpu={budget} {mode:13s} b={b} m={m}: decode {r['decode_tokens_per_s']:.1f} tok/s "
            f"({r['decode_ms_per_token']:.1f} ms/step, LP {pred_ms:.1f}), total {r['total_tokens_per_s']:.1f} tok/s, "
            f"prefill {pre:.2f} s, host {r['host_pinned_gb']} GB")
        cm.close()
        del cm
        free_memory()
    return rows
