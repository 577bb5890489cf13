#!/usr/bin/env python
"""Where a decode step's time goes with the CPU attention lane (issue 17): host timestamps of
the lane's hand-off, per unit, median over the decode steps of one generate call.

    python tools/lane_timing_probe.py [--point llama-3-8b:32:2048] [--fraction 0.45] [--eager]

Printed per unit (ms, medians): host issue from `begin` to `end` (the GPU's own attention
part), the worker's wake after `begin` (the query's copy down), its copy of new rows into the
head-major store, the kernel, the host's wait in `end`, the host's issue from `end` to the
next unit's `begin` (the layer's rest and the next layer's front), and the worker's idle time
from one unit's kernel to the next unit's (the GPU's merge, the layer's rest, the next query,
its copy down: the lane's critical path).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--point", default="llama-3-8b:32:2048")
    ap.add_argument("--fraction", type=float, default=0.45)
    ap.add_argument("--mode", default="pipelined")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()

    from benchlib import env
    from benchlib.plan import compiled, get_spec, point_budget_gb
    import kvc.runtime.cpu_attention as ca
    from kvc.models import build_model

    log: list[tuple] = []
    pa, fill, begin, end = ca.partial_attention, ca.CpuLane._fill, ca.CpuLane.begin, ca.CpuLane.end

    def t_pa(*a, **k):
        t0 = time.perf_counter()
        r = pa(*a, **k)
        log.append(("kernel", t0, time.perf_counter()))
        return r

    def t_fill(self, *a):
        t0 = time.perf_counter()
        fill(self, *a)
        log.append(("fill", t0, time.perf_counter()))

    def t_begin(self, unit, *a, **k):
        log.append(("begin", time.perf_counter(), unit))
        return begin(self, unit, *a, **k)

    def t_end(self, unit):
        t0 = time.perf_counter()
        r = end(self, unit)
        log.append(("end", t0, time.perf_counter(), unit))
        return r
    ca.partial_attention, ca.CpuLane._fill, ca.CpuLane.begin, ca.CpuLane.end = t_pa, t_fill, t_begin, t_end

    if not torch.cuda.is_available():  # a smoke run (CPU: the lane runs inline)
        env.DEVICE, env.DTYPE, env.DTYPE_NAME = "cpu", torch.float32, "float32"
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    name, b, s = args.point.split(":")
    b, s = int(b), int(s)
    spec = get_spec(name)
    hw = env.card_preset()
    extra = [f"schedule.cpu_attention_fraction={args.fraction}", "hardware.cpu_attn_gbps=50",
             "hardware.cpu_attn_threads=14"] + (["schedule.cuda_graphs=false"] if args.eager else [])
    model = build_model(spec, env.DEVICE, env.DTYPE, seed=0)
    cm, _ = compiled(model, spec, args.mode, b, s, hw, point_budget_gb(spec, name, hw, b, s), extra=extra)
    ids = torch.randint(0, spec.vocab_size, (b, s), device=env.DEVICE)
    cm.generate(ids, 3)
    log.clear()
    sync()
    t0 = time.perf_counter()
    cm.generate(ids, args.steps)
    sync()
    total = time.perf_counter() - t0
    begins = [e for e in log if e[0] == "begin"]
    ends = [e for e in log if e[0] == "end"]
    fills = [e for e in log if e[0] == "fill"]
    kernels = [e for e in log if e[0] == "kernel"]
    rows = {"issue begin->end": [], "wake (begin->fill start)": [], "fill": [], "kernel": [],
            "host waits in end": [], "end->next begin": [], "unit total (begin->next begin)": [],
            "worker idle (kernel end->next kernel)": []}
    # decode-step units only: the lane's fills made at the prefill come before the first begin
    fills = [f for f in fills if f[1] >= begins[0][1]]
    for k, bg in enumerate(begins):
        en = ends[k]
        rows["issue begin->end"].append(en[1] - bg[1])
        rows["host waits in end"].append(en[2] - en[1])
        if k < len(fills):
            rows["wake (begin->fill start)"].append(fills[k][1] - bg[1])
            rows["fill"].append(fills[k][2] - fills[k][1])
        if k < len(kernels):
            rows["kernel"].append(kernels[k][2] - kernels[k][1])
        if k + 1 < len(begins) and begins[k + 1][2] > bg[2]:  # the same step
            rows["end->next begin"].append(begins[k + 1][1] - en[2])
            rows["unit total (begin->next begin)"].append(begins[k + 1][1] - bg[1])
            if k + 1 < len(kernels):  # kernel k is begin k's; the CPU's gap, its critical path
                rows["worker idle (kernel end->next kernel)"].append(kernels[k + 1][1] - kernels[k][2])
    print(f"{args.point} {args.mode} fraction {args.fraction} graphs {not args.eager}: "
          f"{len(begins)} lane units, generate({args.steps}) {total * 1e3:.1f} ms")
    for key, xs in rows.items():
        if xs:
            print(f"  {key:34s} median {statistics.median(xs) * 1e3:7.3f} ms   p90 "
                  f"{sorted(xs)[int(0.9 * (len(xs) - 1))] * 1e3:7.3f}   n {len(xs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
