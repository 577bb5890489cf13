#!/usr/bin/env python
"""The CPU attention lane (issue 17) on one machine, in one call: how fast the host attends
over a layer's cache in place, and what the lane does to a decode step.

    python tools/cpu_lane_bench.py --out DIR                      # the H200 points below
    python tools/cpu_lane_bench.py --points tiny-opt:2:64 --device cpu --fractions 0.5   # smoke

1. Kernel: kvc.runtime.cpu_attention.partial_attention over one layer's head-major K,V copy
   (what the lane reads) at each point's shape, fp16 and bf16, at several thread counts,
   alone and beside a pinned host-to-GPU copy loop: ms and the K,V GB/s it reads (beside the
   copies: the rate `hardware.cpu_attn_gbps` means).
2. Steps (tools/benchlib's timing: a sync after the prefill, steps timed as in use): at each
   point, full_offload and pipelined without the lane, pipelined with the lane forced to each
   `--fractions` value (schedule.cpu_attention_fraction), and pipelined and
   full_offload with `schedule.cpu_attention=auto` planned with the kernel's measured rate
   and/or the profiler's (`--auto-rates`), under the lane guard (kvc.runtime.lane_guard) and/or
   with the lane at every step (`--guard`); each row with the
   LP's prediction and, for the lane rows, against pipelined without the lane over 8 greedy
   steps: the largest logit difference while both decoded the same tokens, and the share of
   rows whose tokens all agree (fp16: both round, so a near tie may pick another token;
   benchlib.check.same_path_diff).
Writes <date>-<card>-cpu-lane.{md,json} to --out.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def kernel_rows(spec, batch, context, dtypes, threads_list, reps=5) -> list[dict]:
    """partial_attention over one layer's head-major K,V copy (what the lane reads; each call
    over K,V not read for a while, kvc.profiler.cpu_lane.kernel_s), alone and beside a pinned
    host-to-GPU copy loop (as in a decode step): ms and K,V GB/s."""
    from kvc.profiler.cpu_lane import CopyLoop, kernel_s

    rows = []
    kv_heads, d, h = spec.num_kv_heads, spec.head_dim, spec.num_heads
    cuda = torch.cuda.is_available()
    shape = (batch, kv_heads, context, d)
    for dtype in dtypes:
        q = torch.randn(batch, h, d).to(dtype)
        nbytes = 2 * batch * kv_heads * context * d * q.element_size()
        for threads in threads_list:
            torch.set_num_threads(threads)
            ms = kernel_s(q, shape, dtype, reps) * 1e3
            row = {"dtype": str(dtype).replace("torch.", ""), "threads": threads,
                   "kv_mb": round(nbytes / 1e6, 1), "ms": round(ms, 3), "gbps": round(nbytes / ms / 1e6, 2)}
            if cuda:
                with CopyLoop(torch.device("cuda")):
                    ms2 = kernel_s(q, shape, dtype, reps) * 1e3
                row.update(ms_copying=round(ms2, 3), gbps_copying=round(nbytes / ms2 / 1e6, 2))
            rows.append(row)
            print(f"kernel {spec.model_type} b={batch} s={context} {row}", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    return rows


def guard_fig(cache) -> dict | None:
    g = getattr(cache, "guard", None)
    if g is None:
        return None
    return {"lane": g.on, "switches": g.switches, "steps": g.n,
            **{("lane_ms" if arm else "bare_ms"): round(t * 1e3, 2) for arm, t in g.means.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="opt-6.7b:32:1024,llama-3-8b:32:2048,llama-2-7b:32:2048")
    ap.add_argument("--fractions", default="0.2,0.3,0.4")
    ap.add_argument("--threads", default="14,8")
    ap.add_argument("--eager", action="store_true",
                    help="also each forced fraction without CUDA graphs (schedule.cuda_graphs=false)")
    ap.add_argument("--dtypes", default=None, help="kernel rows' dtypes (default: float16,bfloat16 on a GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--auto-modes", default="pipelined,full_offload",
                    help="the modes planned with schedule.cpu_attention=auto (comma separated; empty: none)")
    ap.add_argument("--auto-rates", default="kernel,profile",
                    help="the rates the auto rows are planned with (comma separated): kernel (this point's "
                         "own layer, measured above) and/or profile (kvc.profiler.cpu_lane's, what "
                         "`kvc profile` gives a user)")
    ap.add_argument("--guard", default="on",
                    help="auto rows under the lane guard (on: what a user runs), with the lane at every "
                         "step (off: what the guard costs or saves), or both (on,off)")
    ap.add_argument("--sweep-threads", action="store_true",
                    help="also the first fraction with each other --threads count (its own measured rate): "
                         "how many of the host's cores the lane should take")
    ap.add_argument("--row-timeout", type=float, default=0.0,
                    help="seconds a step row may take; past them every thread's stack is printed and "
                         "the run exits 3 (a stalled lane: the rows before it are printed already)")
    ap.add_argument("--switch-intervals", default="",
                    help="also each lane row with Python's GIL switch interval at these seconds (comma "
                         "separated; sys.setswitchinterval): how long the lane's worker waits for the GIL "
                         "the host thread holds between its torch ops")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from benchlib import env
    from benchlib.check import same_path_diff
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
    lane_fig = {}
    if args.device == "cuda":  # the profiler's figures (kvc profile measures the same)
        from kvc.profiler.cpu_lane import cpu_attention
        lane_fig = cpu_attention(torch.device("cuda"), env.DTYPE, threads_list[0])
        print(f"profile {lane_fig}", flush=True)
    fixed = (f"hardware.cpu_attn_fixed_us={lane_fig['cpu_attn_fixed_us']:.1f}",) if lane_fig else ()
    for point in args.points.split(","):
        name, batch, context = point.split(":")
        batch, context = int(batch), int(context)
        spec = get_spec(name)
        dtypes = ([getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else
                  [torch.float16, torch.bfloat16] if args.device == "cuda" else [torch.float32])
        k_rows = kernel_rows(spec, batch, context, dtypes, threads_list)
        kernels += [{"model": name, "batch": batch, "context": context, **r} for r in k_rows]
        rates = {}  # per thread count: the kernel's best rate, as in a step (beside the copies)
        for t in threads_list:
            best = max((r for r in k_rows if r["dtype"] == env.DTYPE_NAME and r["threads"] == t),
                       key=lambda r: r["gbps"], default=None)
            rates[t] = (best.get("gbps_copying") or best["gbps"]) if best else 0.0
        rate = rates[threads_list[0]]
        model = build_model(spec, env.DEVICE, env.DTYPE, seed=0)
        ids = torch.randint(0, spec.vocab_size, (batch, context), device=env.DEVICE)
        budget = point_budget_gb(spec, name, hw_name, batch, context)
        off = ("schedule.cpu_attention=off",)  # the card's preset may carry a lane
        def lane_hw(t, rates=rates):
            return (f"hardware.cpu_attn_gbps={rates[t]}", f"hardware.cpu_attn_threads={t}", *fixed)
        cases = [("full_offload", "off", off), ("pipelined", "off", off)]
        cases += [("pipelined", f"forced {f}", (f"schedule.cpu_attention_fraction={f}", *lane_hw(threads_list[0])))
                  for f in fractions]
        if args.sweep_threads:  # the first fraction at the other thread counts
            cases += [("pipelined", f"forced {fractions[0]}, {t} threads",
                       (f"schedule.cpu_attention_fraction={fractions[0]}", *lane_hw(t)))
                      for t in threads_list[1:] if fractions]
        if args.eager:
            cases += [("pipelined", f"forced {f} eager", (f"schedule.cpu_attention_fraction={f}", *lane_hw(threads_list[0]),
                                                          "schedule.cuda_graphs=false"))
                      for f in fractions]
        auto_rates = {"kernel": rate, "profile": round(lane_fig.get("cpu_attn_gbps", 0.0), 2)}
        edits = {}  # per row label: how its plan differs from make_plan's (none: as made)
        for mode in filter(None, args.auto_modes.split(",")):
            for which in filter(None, args.auto_rates.split(",")):
                for guard in filter(None, args.guard.split(",")):
                    if auto_rates[which] <= 0:
                        continue
                    lane = f"auto ({which} {auto_rates[which]} GB/s{'' if guard == 'on' else ', unguarded'})"
                    cases.append((mode, lane, ("schedule.cpu_attention=auto", f"hardware.cpu_attn_gbps={auto_rates[which]}",
                                               f"hardware.cpu_attn_threads={threads_list[0]}", *fixed)))
                    if guard != "on":  # a plan not priced at a rate runs its lane every step
                        edits[lane] = lambda p: replace(p, cpu_gbps=0.0)
        switch = {}  # per row label: its GIL switch interval (none: Python's, 5 ms)
        lane_rows = [row for row in cases if row[1] != "off"]
        for x in (float(x) for x in args.switch_intervals.split(",") if x):
            for mode, lane, extra in lane_rows:
                label = f"{lane}, switch {x * 1e3:g} ms"
                cases.append((mode, label, extra))
                switch[label] = x
                if lane in edits:
                    edits[label] = edits[lane]
        default_switch = sys.getswitchinterval()
        base = None
        for mode, lane, extra in cases:
            sys.setswitchinterval(switch.get(lane, default_switch))
            if args.row_timeout:  # no CUDA call in the dump: a stall may hold the context's lock
                print(f"row {name} {mode} {lane}", flush=True)
                faulthandler.dump_traceback_later(args.row_timeout, exit=True)
            cm, r = compiled(model, spec, mode, batch, context, hw_name, budget, extra=extra, edit=edits.get(lane))
            pred = predict(spec, r.hardware, cm.plan, context, batch, env.DTYPE_NAME)["predicted_step_ms"]
            ms = compiled_decode_ms(cm, ids, args.steps, args.repeats)
            tokens, logits = cm.generate(ids, 8, return_logits=True)
            if mode == "pipelined" and lane == "off":
                base = tokens, logits
            diff, same = (None, None) if base is None or lane == "off" else \
                same_path_diff(tokens, logits, *base)
            cpu = cm._cache.cpu_rows if cm._cache is not None else {}
            frac = (round(sum(c for _, c in cpu.values()) / max(1, len(cpu)) / (context + 8), 3)
                    if cpu else 0.0)
            row = {"model": name, "batch": batch, "context": context, "mode": mode, "lane": lane,
                   "ms": round(ms, 2), "lp_ms": round(pred, 2), "cpu_fraction_last_step": frac,
                   "max_logit_diff_vs_off": None if diff is None else round(diff, 4),
                   "rows_same_tokens": None if same is None else round(same, 3),
                   "threads": cm.plan.cpu_threads if cm.plan.cpu_lane else None,
                   "switch_ms": round(sys.getswitchinterval() * 1e3, 3),
                   # its guard (kvc.runtime.lane_guard): the arm in use at the end, how often
                   # it changed, and the last round's mean step of each arm
                   "guard": guard_fig(cm._cache),
                   # CUDA graphs captured in all (a shape the recompute never had captures anew)
                   "graphs_captured": getattr(getattr(cm, "graphs", None), "captured", None)}
            faulthandler.cancel_dump_traceback_later()
            steps.append(row)
            print(f"step {row}", flush=True)
            cm.close()
            sys.setswitchinterval(default_switch)
            del cm
            env.free_memory()
        del model
        env.free_memory()
    off = {(r["model"], r["mode"]): r["ms"] for r in steps if r["lane"] == "off"}
    lines = [f"# CPU attention lane, {card}, {datetime.date.today()}", "",
             "| model | batch | context | dtype | threads | K,V MB | ms | GB/s | ms beside copies | GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['context']} | {r['dtype']} | {r['threads']} | "
              f"{r['kv_mb']} | {r['ms']} | {r['gbps']} | {r.get('ms_copying', '')} | {r.get('gbps_copying', '')} |"
              for r in kernels]
    lines += ["", "| model | mode | lane | ms/token | LP ms | vs full_offload | CPU share (last step) | max logit diff, same tokens | rows same tokens |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
        ref = off.get((r["model"], "full_offload"))
        lines.append(f"| {r['model']} b{r['batch']} s{r['context']} | {r['mode']} | {r['lane']} | {r['ms']} | "
                     f"{r['lp_ms']} | {r['ms'] / ref:.3f} | {r['cpu_fraction_last_step']} | "
                     f"{r['max_logit_diff_vs_off']} | {r['rows_same_tokens']} |" if ref else "")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        env.write_results(args.out, card, "cpu-lane", text, {"kernels": kernels, "steps": steps, "profile": lane_fig})
    return 0


if __name__ == "__main__":
    sys.exit(main())
