#!/usr/bin/env python
"""Why one lane split's step time moves between runs (issue 17, session 12): the same split,
compiled anew `--compiles` times in one process, each timed `--rounds` times, with the
kernel's own rate inside the steps (bytes of K,V it read over its wall time, median per
round). Run it once as is and once with THP_MEM_ALLOC_ENABLE=1 (torch's CPU allocator
asks for transparent huge pages: the head-major rows span hundreds of MB) to compare.

    python tools/lane_variance_probe.py --point llama-3-8b:32:2048 --fraction 0.4

Prints the host's THP setting, then one line per round: ms/token, kernel median ms and
GB/s, worker-side units timed; and where the step's time went beside the kernel: per step,
how long the compute stream waited at the merges for the CPU's parts (CUDA events around
`CpuLane.end`, which queues the flag poll and the partial's copy up) and how long the worker
slept waiting for the GPU's flags (the query's copy down, the write-backs). A slow step with
long GPU waits is the CPU's; one with long worker waits is the GPU's or the link's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--point", default="llama-3-8b:32:2048")
    ap.add_argument("--fraction", type=float, default=0.4)
    ap.add_argument("--compiles", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=14)
    args = ap.parse_args()

    from benchlib import env
    from benchlib.plan import compiled, get_spec, point_budget_gb
    from benchlib.timing import compiled_decode_ms

    import kvc.runtime.cpu_attention as ca
    from kvc.models import build_model

    log: list[tuple[float, int]] = []
    pa = ca.partial_attention

    def timed(q, kk, vv, *a, **k):
        t0 = time.perf_counter()
        r = pa(q, kk, vv, *a, **k)
        log.append((time.perf_counter() - t0, 2 * kk.numel() * kk.element_size()))
        return r
    ca.partial_attention = timed

    waits: list[float] = []  # the worker's sleeps on the GPU's flags, seconds
    merges: list[tuple] = []  # CUDA events around each CpuLane.end (the poll, the copy up)
    cuda = torch.cuda.is_available()
    if cuda:
        from kvc.runtime import flagwait
        await_, end = flagwait.FlagWait.await_, ca.CpuLane.end

        def timed_await(self, *a, **k):
            t0 = time.perf_counter()
            await_(self, *a, **k)
            waits.append(time.perf_counter() - t0)

        def timed_end(self, unit):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            r = end(self, unit)
            e1.record()
            merges.append((e0, e1))
            return r
        flagwait.FlagWait.await_, ca.CpuLane.end = timed_await, timed_end

    if not torch.cuda.is_available():  # a smoke run (CPU: the lane runs inline)
        env.DEVICE, env.DTYPE, env.DTYPE_NAME = "cpu", torch.float32, "float32"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"THP {thp.read_text().strip() if thp.exists() else '?'}; THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset)')}", flush=True)
    name, b, s = args.point.split(":")
    b, s = int(b), int(s)
    spec = get_spec(name)
    hw = env.card_preset()
    extra = [f"schedule.cpu_attention_fraction={args.fraction}", "hardware.cpu_attn_gbps=45",
             f"hardware.cpu_attn_threads={args.threads}"]
    model = build_model(spec, env.DEVICE, env.DTYPE, seed=0)
    ids = torch.randint(0, spec.vocab_size, (b, s), device=env.DEVICE)
    for c in range(args.compiles):
        cm, _ = compiled(model, spec, "pipelined", b, s, hw, point_budget_gb(spec, name, hw, b, s), extra=extra)
        for r in range(args.rounds):
            log.clear()
            waits.clear()
            merges.clear()
            ms = compiled_decode_ms(cm, ids, args.steps, 1)
            side = ""
            if cuda and merges:
                torch.cuda.synchronize()
                n = args.steps * spec.num_layers  # the timed steps' units (every layer offloaded)
                gpu = [a.elapsed_time(b) for a, b in merges[-n:]]
                # the worker waits twice a unit (query, write-back) and once per prefill fill
                side = (f"; per step: the GPU waited {sum(gpu) / args.steps:.1f} ms at the merges "
                        f"(median {statistics.median(gpu):.3f} a unit), the worker "
                        f"{sum(waits[-2 * n:]) * 1e3 / args.steps:.1f} ms for the GPU's flags")
            big = [(t, n) for t, n in log if n > 0][-args.steps * spec.num_layers:]  # the timed steps' units
            if not big:
                print(f"{args.point} compile {c} round {r}: {ms:.2f} ms/token, no lane units", flush=True)
                continue
            t_med = statistics.median(t for t, _ in big)
            gbps = statistics.median(n / t / 1e9 for t, n in big)
            print(f"{args.point} fraction {args.fraction} compile {c} round {r}: {ms:.2f} ms/token, "
                  f"kernel median {t_med * 1e3:.3f} ms, {gbps:.1f} GB/s (p10 "
                  f"{sorted(n / t / 1e9 for t, n in big)[len(big) // 10]:.1f}), units {len(big)}{side}", flush=True)
        cm.close()
        del cm
        env.free_memory()
    return 0


if __name__ == "__main__":
    sys.exit(main())
