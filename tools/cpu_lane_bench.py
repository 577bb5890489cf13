#!/usr/bin/env python
"""The CPU attention lane (issue 17) on one machine, in one call: how fast the host attends
over a layer's cache in place, and what the lane does to a decode step.

    python tools/cpu_lane_bench.py --out DIR                      # the H200 points below
    python tools/cpu_lane_bench.py --points tiny-opt:2:64 --device cpu --fractions 0.5   # smoke

1. Kernel: kvc.runtime.cpu_attention.partial_attention over one layer's token-major pinned
   K,V pool at each point's shape, fp16 and bf16, at several thread counts: ms and the K,V
   GB/s it reads (the rate `hardware.cpu_attn_gbps` means).
2. Steps (tools/benchlib's timing: a sync after the prefill, steps timed as in use): at each
   point, full_offload and pipelined without the lane, pipelined with the lane forced to each
   `--fractions` value (schedule.cpu_attention_fraction), and pipelined with
   `schedule.cpu_attention=auto` planned with the kernel's measured rate; each row with the
   LP's prediction and, for the lane rows, the largest logit difference from the run without
   it over 8 steps (fp16: both round; tokens may differ at near-ties).
Writes <date>-<card>-cpu-lane.{md,json} to --out.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def kernel_rows(spec, batch, context, dtypes, threads_list, reps=5) -> list[dict]:
    from kvc.runtime.cpu_attention import partial_attention

    pin = torch.cuda.is_available()  # the pools are pinned where there is a GPU
    rows = []
    kv_heads, d, h = spec.num_kv_heads, spec.head_dim, spec.num_heads
    for dtype in dtypes:
        k = torch.randn(context, batch, kv_heads, d).to(dtype)
        v = torch.randn(context, batch, kv_heads, d).to(dtype)
        if pin:
            k, v = k.pin_memory(), v.pin_memory()
        q = torch.randn(batch, h, d).to(dtype)
        nbytes = 2 * k.nbytes
        for threads in threads_list:
            torch.set_num_threads(threads)
            partial_attention(q, k, v, d ** -0.5)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                partial_attention(q, k, v, d ** -0.5)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            rows.append({"dtype": str(dtype).replace("torch.", ""), "threads": threads,
                         "kv_mb": round(nbytes / 1e6, 1), "ms": round(ms, 3),
                         "gbps": round(nbytes / ms / 1e6, 2)})
            print(f"kernel {spec.model_type} b={batch} s={context} {rows[-1]}", flush=True)
        del k, v
    torch.set_num_threads(os.cpu_count() or 1)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="opt-6.7b:32:1024,llama-3-8b:32:2048,llama-2-7b:32:2048")
    ap.add_argument("--fractions", default="0.2,0.3,0.4")
    ap.add_argument("--threads", default="14,8")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from benchlib import env
    from benchlib.plan import compiled, get_spec, point_budget_gb
    from benchlib.timing import compiled_decode_ms
    from kvc.models import build_model
    from kvc.planner.scheduler import predict

    env.DEVICE = args.device
    if args.device == "cpu":
        env.DTYPE, env.DTYPE_NAME = torch.float32, "float32"
    hw_name = env.card_preset()
    threads_list = [int(t) for t in args.threads.split(",")]
    fractions = [float(f) for f in args.fractions.split(",") if f]
    card = env.card_name()
    kernels, steps = [], []
    for point in args.points.split(","):
        name, batch, context = point.split(":")
        batch, context = int(batch), int(context)
        spec = get_spec(name)
        dtypes = [torch.float16, torch.bfloat16] if args.device == "cuda" else [torch.float32]
        k_rows = kernel_rows(spec, batch, context, dtypes, threads_list)
        kernels += [{"model": name, "batch": batch, "context": context, **r} for r in k_rows]
        best = max((r for r in k_rows if r["dtype"] == env.DTYPE_NAME and r["threads"] == threads_list[0]),
                   key=lambda r: r["gbps"], default=None)
        rate = best["gbps"] if best else 0.0
        model = build_model(spec, env.DEVICE, env.DTYPE, seed=0)
        ids = torch.randint(0, spec.vocab_size, (batch, context), device=env.DEVICE)
        budget = point_budget_gb(spec, name, hw_name, batch, context)
        cases = [("full_offload", "off", ()), ("pipelined", "off", ("schedule.cpu_attention=off",))]
        cases += [("pipelined", f"forced {f}", (f"schedule.cpu_attention_fraction={f}",
                                                f"hardware.cpu_attn_threads={threads_list[0]}"))
                  for f in fractions]
        cases += [("pipelined", f"auto ({rate} GB/s)", ("schedule.cpu_attention=auto",
                                                        f"hardware.cpu_attn_gbps={rate}",
                                                        f"hardware.cpu_attn_threads={threads_list[0]}"))]
        base_logits = None
        for mode, lane, extra in cases:
            cm, r = compiled(model, spec, mode, batch, context, hw_name, budget, extra=extra)
            pred = predict(spec, r.hardware, cm.plan, context, batch, env.DTYPE_NAME)["predicted_step_ms"]
            ms = compiled_decode_ms(cm, ids, args.steps, args.repeats)
            _, logits = cm.generate(ids, 8, return_logits=True)
            if mode == "pipelined" and lane == "off":
                base_logits = logits
            diff = None if base_logits is None or lane == "off" else \
                round((logits - base_logits).abs().max().item(), 4)
            cpu = cm._cache.cpu_rows if cm._cache is not None else {}
            frac = (round(sum(c for _, c in cpu.values()) / max(1, len(cpu)) / (context + 8), 3)
                    if cpu else 0.0)
            row = {"model": name, "batch": batch, "context": context, "mode": mode, "lane": lane,
                   "ms": round(ms, 2), "lp_ms": round(pred, 2), "cpu_fraction_last_step": frac,
                   "max_logit_diff_vs_off": diff, "threads": threads_list[0]}
            steps.append(row)
            print(f"step {row}", flush=True)
            cm.close()
            del cm
            env.free_memory()
        del model
        env.free_memory()
    off = {(r["model"], r["mode"]): r["ms"] for r in steps if r["lane"] == "off"}
    lines = [f"# CPU attention lane, {card}, {datetime.date.today()}", "",
             "| model | batch | context | dtype | threads | K,V MB | ms | GB/s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['context']} | {r['dtype']} | {r['threads']} | "
              f"{r['kv_mb']} | {r['ms']} | {r['gbps']} |" for r in kernels]
    lines += ["", "| model | mode | lane | ms/token | LP ms | vs full_offload | CPU share (last step) | max logit diff |",
              "|---|---|---|---|---|---|---|---|"]
    for r in steps:
        ref = off.get((r["model"], "full_offload"))
        lines.append(f"| {r['model']} b{r['batch']} s{r['context']} | {r['mode']} | {r['lane']} | {r['ms']} | "
                     f"{r['lp_ms']} | {r['ms'] / ref:.3f} | {r['cpu_fraction_last_step']} | "
                     f"{r['max_logit_diff_vs_off']} |" if ref else "")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        env.write_results(args.out, card, "cpu-lane", text, {"kernels": kernels, "steps": steps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
