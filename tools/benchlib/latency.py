"""One latency grid point: every mode's decode step timed against the LP's prediction."""
from __future__ import annotations

import torch

from kvc.errors import KvcError
from kvc.ir.graph import host_kinds
from kvc.models import build_model
from kvc.planner.scheduler import predict

from . import env
from .env import MODES, free_memory
from .hf import hf_offloaded
from .plan import compiled, get_spec, point_budget_gb
from .profiling import profile_step
from .timing import compiled_decode_ms, host_ms, steps_for


def bench_point(name, batch, context, hw_name, steps, repeats, with_hf, log=print,
                profile_dir=None, modes=MODES) -> list[dict]:
    spec = get_spec(name)
    model = build_model(spec, env.DEVICE, env.DTYPE, seed=0)
    ids = torch.randint(0, spec.vocab_size, (batch, context), device=env.DEVICE)
    budget = point_budget_gb(spec, name, hw_name, batch, context)
    card_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if env.DEVICE == "cuda" else 64.0
    rows = []
    for mode, graphs in [(m, g) for m in modes for g in env.GRAPHS]:
        try:
            cm, r = compiled(model, spec, mode, batch, context, hw_name,
                             card_gb if mode == "gpu_resident" else budget,
                             extra=(f"schedule.cuda_graphs={str(graphs).lower()}",))
        except KvcError as e:
            log(f"{name} b={batch} s={context} {mode}: skipped ({e})")
            continue
        n = steps_for(predict(spec, r.hardware, cm.plan, context, batch, env.DTYPE_NAME)["predicted_step_ms"], steps)
        try:
            ms = compiled_decode_ms(cm, ids, n, repeats)
        except torch.OutOfMemoryError as e:
            log(f"{name} b={batch} s={context} {mode}: out of memory ({str(e)[:80]})")
            cm.close()
            free_memory()
            continue
        host = host_ms(cm, ids, min(n, 4))
        pred = predict(spec, r.hardware, cm.plan, context + n // 2, batch, env.DTYPE_NAME)
        moved = int(pred["h2d_bytes"])
        rows.append({
            "model": name, "batch": batch, "context": context, "setting": "latency", "mode": mode,
            "decode_ms_per_token": round(ms, 3), "predicted_ms": round(pred["predicted_step_ms"], 3),
            "steps_timed": n,
            "decode_tokens_per_s": round(batch * 1e3 / ms, 2), "bytes_per_step": moved,
            "link_utilization": round(moved / (ms / 1e3) / (r.hardware.h2d_gbps * 1e9), 3),
            "recompute_fraction_mid": round(sum(cm.plan.recompute_tokens(i, context) for i in range(spec.num_layers))
                                            / max(1, spec.num_layers * context), 3),
            "gpu_mem_gb_budget": round(card_gb if mode == "gpu_resident" else budget, 1),
            "host_ms_per_step": round(host, 3), "predicted_host_ms": round(pred["host_ms"], 3),
            "decode_nodes": host_kinds(cm.decode_step), "cuda_graphs": graphs,
        })
        log(f"{name} b={batch} s={context} {mode:13s}{' graphs' if graphs else ' eager '} {ms:8.2f} ms/token "
            f"(LP {pred['predicted_step_ms']:.2f}) moved {moved / 1e9:.2f} GB, host {host:.2f} ms "
            f"(LP host {pred['host_ms']:.2f})")
        if profile_dir is not None:
            rows[-1]["profile"] = profile_step(
                cm, ids, profile_dir / f"trace-{name}-b{batch}-s{context}-{mode}{'' if graphs else '-eager'}.json", log)
        cm.close()
        del cm
        free_memory()
    del model
    free_memory()
    if with_hf:
        rows += hf_offloaded(name, spec, batch, context, min(steps, 4), log)
    return rows
