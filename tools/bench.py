"""Benchmark every schedule on one GPU, check it against the reference first, write a table.

    python tools/bench.py --grid main --out benchmarks/results      # on the GPU machine
    python tools/bench.py --grid quick --check-only                  # correctness only

For each grid point (model preset, batch, context = prompt length, gen 32) one model with
dummy fp16 weights is built on the GPU and every mode is lowered from it with the LP's plan
for the card's hardware preset, with `hardware.gpu_mem_gb` set so that the KV cache does not
fit next to the weights (gpu_resident is measured with the card's whole memory, where it
fits). Decode time per token: generate(n=1+N) timed from a sync after the prefill to a sync
after the last step, / N, median of REPEATS, after a warm-up; N = --steps or more, so that a
timing covers about 1 s. The host time per step is measured apart, each step on an idle GPU.
Transformers' offloaded cache runs the same shape with `cache_implementation="offloaded"`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# the jobs, one module each under tools/benchlib/ (tools/ is the script's own folder); their
# names are re-exported here for tools/repredict.py and the tests
from benchlib import env
from benchlib.check import LOGIT_TOL, check, logit_tol  # noqa: F401
from benchlib.env import (  # noqa: F401
    GEN_LEN,
    GRIDS,
    HOST_GB,
    MODES,
    THROUGHPUT,
    TP_BATCHES,
    TP_MICRO,
    TP_PROMPT,
    card_name,
    card_preset,
    free_memory,
    sync,
)
from benchlib.hf import hf_config, hf_offloaded  # noqa: F401
from benchlib.latency import bench_point
from benchlib.plan import (  # noqa: F401
    compiled,
    get_spec,
    offload_budget_gb,
    planned,
    point_budget_gb,
    spec_name,
)
from benchlib.profiling import KERNEL_KINDS, kernel_kind, profile_step  # noqa: F401
from benchlib.throughput import throughput_point
from benchlib.timing import (  # noqa: F401
    StepHost,
    compiled_decode_ms,
    decode_ms,
    host_ms,
    steps_for,
    timed,
    with_step_hook,
)


def __getattr__(name):
    """The run's state (DEVICE, DTYPE, DTYPE_NAME, HOST_OVERRIDES, GRAPHS) lives in
    benchlib.env, which main sets: bench.DTYPE_NAME reads it there, never a stale copy."""
    if name in ("DEVICE", "DTYPE", "DTYPE_NAME", "HOST_OVERRIDES", "GRAPHS"):
        return getattr(env, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def grid_points(grid: str, points: str) -> list[tuple[str, int, int]]:
    """The grid's points, or those named in `points` ("model:batch:context,..."), in that order."""
    if not points:
        return GRIDS[grid]
    out = []
    for p in points.split(","):
        name, batch, context = p.split(":")
        point = (name, int(batch), int(context))
        if point not in GRIDS[grid]:
            raise SystemExit(f"--points: {p} is not a point of grid {grid!r}; expected one of "
                             + ", ".join(f"{n}:{b}:{c}" for n, b, c in GRIDS[grid]))
        out.append(point)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="main")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed per measurement")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--check", default="opt-125m", help="comma-separated presets to check, or ''")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--hf", action="store_true", help="also time transformers' offloaded cache")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler trace of one decode step of every offloading mode at each point")
    ap.add_argument("--points", default="",
                    help="grid points to run, in this order, as model:batch:context,... (default: the whole grid)")
    ap.add_argument("--throughput", choices=sorted(THROUGHPUT), default=None,
                    help="also run issue 6's throughput rows (weights and cache on the CPU)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated modes for the latency grid")
    ap.add_argument("--tp-modes", default="full_offload,kvpr,pipelined",
                    help="comma-separated modes for the throughput rows")
    ap.add_argument("--preset-host", action="store_true",
                    help="keep the preset's host-lane costs instead of measuring them at the start")
    ap.add_argument("--skip-latency", action="store_true", help="no latency grid (e.g. with --throughput)")
    ap.add_argument("--cuda-graphs", choices=["on", "off", "both"], default="on",
                    help="latency rows with the decode step's CUDA graphs (schedule.cuda_graphs), "
                         "without, or both (one row each, same call)")
    args = ap.parse_args(argv)
    points = grid_points(args.grid, args.points)  # a bad --points fails before any work
    env.GRAPHS[:] = {"on": [True], "off": [False], "both": [False, True]}[args.cuda_graphs]
    env.DEVICE = args.device
    env.DTYPE, env.DTYPE_NAME = (torch.float16, "float16") if env.DEVICE == "cuda" else (torch.float32, "float32")
    hw_name = card_preset()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    log(f"card: {card_name()}  torch {torch.__version__}  hardware preset {hw_name}")
    host = {}
    if not args.preset_host:
        from kvc.profiler.host import host_us

        host = {k: round(v, 2) for k, v in host_us(env.DEVICE, env.DTYPE).items()}
        env.HOST_OVERRIDES[:] = [f"hardware.{k}={v}" for k, v in host.items()]
        log(f"host lane, measured here (kvc.profiler.host_us): {host}")
    checks = check([n for n in args.check.split(",") if n], hw_name, log=log) if args.check else []
    date = time.strftime("%Y-%m-%d")
    path = out / f"{date}-{card_name().replace(' ', '-')}.json"
    result = {"card": card_name(), "date": date, "torch": torch.__version__,
              "command": "python " + " ".join(sys.argv), "hardware_preset": hw_name,
              "host_us_measured": host,
              "checks": checks, "rows": []}

    def save():  # after every grid point: a run cut short still leaves its numbers
        path.write_text(json.dumps(result, indent=1))
        (out / "bench.log").write_text("\n".join(lines) + "\n")

    save()
    if not args.check_only and args.throughput:
        for name, gpu_gb in THROUGHPUT[args.throughput]:
            result["rows"] += throughput_point(name, gpu_gb, hw_name, log,
                                               tuple(args.tp_modes.split(",")))
            save()
    if not args.check_only and not args.skip_latency:
        for name, batch, context in points:
            main_point = (name, batch, context) == ("opt-6.7b", 32, 1024)
            result["rows"] += bench_point(name, batch, context, hw_name, args.steps, args.repeats,
                                          args.hf and main_point, log,
                                          out if args.profile else None,
                                          tuple(args.modes.split(",")))
            save()
    rows = result["rows"]
    try:
        from plot_bench import plot  # tools/ is the script's own folder

        plot(result, path.with_suffix(".png"))
    except ImportError as e:  # matplotlib is optional on the GPU machine
        log(f"no plot: {e}")
    print(table(rows))
    return 0 if all(c["tokens_equal"] and c["logits_within_tol"] for c in checks) else 1


def table(rows) -> str:
    head = "| model | setting | batch | context | mode | ms/token | LP ms | tokens/s | GB/step | link util |"
    out = [head, "|" + "---|" * 10]
    for r in rows:
        pred = "-" if r["predicted_ms"] is None else f"{r['predicted_ms']:.1f}"
        mb = f" ({r['micro_batches']} mb)" if r.get("micro_batches", 1) > 1 else ""
        eager = " (no graphs)" if r.get("cuda_graphs") is False else ""
        out.append(f"| {r['model']} | {r['setting']} | {r['batch']}{mb} | {r['context']} | {r['mode']}{eager} | "
                   f"{r['decode_ms_per_token']:.1f} | {pred} | {r['decode_tokens_per_s']:.0f} | "
                   f"{r['bytes_per_step'] / 1e9:.2f} | {r.get('link_utilization') or 0:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
