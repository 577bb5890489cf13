#!/usr/bin/env python
"""Soak: thousands of decode steps through the public API, memory sampled as they run
(issue 16: "flat after warm-up").

    # the issue's run, on the H200 (about 2000 decode steps of OPT-6.7B, batch 32, pipelined)
    python tools/soak.py
    # a smoke test anywhere
    python tools/soak.py --preset tiny-opt --steps 200 --device cpu

It compiles a dict config with `kvc.compile` (dummy weights of the preset, the card's
hardware preset, and the offloading GPU budget of tools/benchlib/plan.py's offload_budget_gb:
weights, staging and workspace fit, no layer's KV cache does, so every step streams),
loads it with `kvc.load`, then decodes `--steps` tokens:

  --style chunks (default): generate() `--every` tokens at a time, each from a fresh random
      prompt (the pools are reused call after call: what a server does);
  --style long: one generate() of `--steps` tokens (the prompt shortened so the context fits
      the model), an on_token callback sampling as it goes.

Every `--every` steps it samples host RSS (/proc/self/status VmRSS, and VmHWM), the bytes
pinned through kvc.runtime.pinned (a ledger of cudaHostRegister/Unregister, so a pool that is
never released shows), the bytes of the model's current CPU pools, torch's CUDA host
allocator (when this torch has host_memory_stats), and torch.cuda.memory_allocated /
memory_reserved; plus the decode time per step of the last interval. Prints a table and a
verdict per series (flat after warm-up or not), writes JSON (and a PNG with --plot).
Exit status 1 when a series grows beyond its tolerance.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

import kvc
from kvc.runtime import pinned

ROOT = Path(__file__).resolve().parents[1]

MB = 1 << 20
# growth allowed between the first sample after warm-up and the last, per series
TOLERANCE_MB = {"rss_mb": 64.0, "pinned_mb": 0.0, "pool_mb": 0.0, "gpu_allocated_mb": 16.0,
                "gpu_reserved_mb": 64.0, "host_alloc_mb": 0.0}
TOLERANCE_FRACTION = 0.02  # of the series' own size (RSS of a 13 GB host footprint moves a little)


# --------------------------------------------------------------------------- what is measured


class PinnedLedger:
    """Bytes registered with cudaHostRegister through kvc.runtime.pinned and not yet
    unregistered: every pinned pool of the runtime goes through `_register`/`_unregister`."""

    def __init__(self):
        self.live: dict[int, int] = {}
        self.registered = self.released = 0
        real_reg, real_unreg = pinned._register, pinned._unregister

        def register(ptr: int, nbytes: int) -> int:
            rc = real_reg(ptr, nbytes)
            if rc == 0:
                self.live[ptr] = nbytes
                self.registered += 1
            return rc

        def unregister(ptr: int) -> int:
            rc = real_unreg(ptr)
            if self.live.pop(ptr, None) is not None:
                self.released += 1
            return rc

        pinned._register, pinned._unregister = register, unregister

    @property
    def bytes(self) -> int:
        return sum(self.live.values())


def _status_mb(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return float("nan")


def _pool_bytes(model) -> int:
    """The model's CPU pools as the runtime holds them now: the cache's activation and K,V
    pools and the weight streamer's flat pools (0 for what it does not have)."""
    total, seen = 0, set()
    cache = getattr(model, "_cache", None)
    weights = getattr(model, "_weights", None)
    tensors = [getattr(cache, n, None) for n in ("act_pool", "k_pool", "v_pool")]
    if weights is not None:
        tensors.append(getattr(weights, "flat", None))
        tensors += [getattr(p, "flat", None) for p in getattr(weights, "pools", ()) or ()]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def sample(model, ledger: PinnedLedger, step: int, t0: float, ms_per_step: float | None) -> dict:
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(model.device)
    row = {"step": step, "t_s": round(time.perf_counter() - t0, 2),
           "ms_per_step": None if ms_per_step is None else round(ms_per_step, 3),
           "rss_mb": round(_status_mb("VmRSS"), 1), "hwm_mb": round(_status_mb("VmHWM"), 1),
           "pinned_mb": round(ledger.bytes / MB, 1), "pool_mb": round(_pool_bytes(model) / MB, 1)}
    if cuda:
        row["gpu_allocated_mb"] = round(torch.cuda.memory_allocated(model.device) / MB, 1)
        row["gpu_reserved_mb"] = round(torch.cuda.memory_reserved(model.device) / MB, 1)
        host_stats = getattr(torch.cuda, "host_memory_stats", None)
        if host_stats is not None:
            try:
                row["host_alloc_mb"] = round(host_stats().get("allocated_bytes.all.current", 0) / MB, 1)
            except RuntimeError:
                pass
    return row


# --------------------------------------------------------------------------- the run


def budget_gb(preset: str, hardware: str, dtype: str, batch: int, s_max: int) -> float:
    """tools/benchlib/plan.py's offload_budget_gb, in the model's own dtype: room for the
    weights, the staging buffers, workspace and margin, and half a layer's KV cache more, so
    no layer's cache fits and every offloading mode streams all of it."""
    from kvc.api import resolve
    from kvc.config import load_config
    from kvc.planner.cost import memory_terms

    r = resolve(load_config({"model": {"preset": preset, "dtype": dtype}}, [f"hardware={hardware}"]))
    t = memory_terms(r.spec, r.hardware, batch, s_max, dtype, 2, True)
    need = t["weights_gb"] + t["staging_gb"] + t["workspace_gb"] + t["margin_gb"]
    return math.ceil((need + 0.5 * t["layer_kv_gb"]) * 1000) / 1000


def run(args) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hardware = args.hardware or ("h200-pcie5" if device == "cuda" else "cpu")
    dtype = args.dtype or ("float16" if device == "cuda" else "float32")
    every = args.every
    steps = int(math.ceil(args.steps / every) * every)
    from kvc.models import preset as spec_of

    spec = spec_of(args.preset)
    if args.style == "long":  # one call: prompt + steps must fit the model's positions
        prompt = max(1, min(args.prompt_len, spec.max_positions - steps - 3))
        gen = steps + 1  # on_token's step 0 is the prefill's token: the last decode step is `steps`
    else:
        prompt, gen = args.prompt_len, every
    budget = args.gpu_mem_gb or budget_gb(args.preset, hardware, dtype, args.batch, prompt + gen)
    config = {"model": {"preset": args.preset, "dtype": dtype}, "hardware": hardware,
              "workload": {"batch_size": args.batch, "prompt_len": prompt, "gen_len": gen},
              "schedule": {"mode": args.mode}}
    overrides = [f"hardware.gpu_mem_gb={budget}", *args.override]
    ledger = PinnedLedger()
    out_dir = Path(args.artifact or (ROOT / "artifacts" / f"soak-{args.preset}-b{args.batch}-{args.mode}.kvc"))
    t0 = time.perf_counter()
    print(f"soak: compiling {args.preset} b{args.batch} {args.mode} on {hardware} (GPU budget {budget:g} GB, "
          f"prompt {prompt}, {gen} tokens a call) -> {out_dir}", flush=True)
    path = kvc.compile(config, overrides, output=out_dir)
    model = kvc.load(path, device=device)
    plan = model.plan
    print(f"soak: loaded in {time.perf_counter() - t0:.1f} s: {len(plan.offloaded_units)}/{plan.num_units} "
          f"units offloaded, {len(plan.streamed_layers)} layers' weights streamed, "
          f"{plan.micro_batches} micro-batch(es); {steps} steps, sampling every {every}", flush=True)
    gen_ids = torch.Generator().manual_seed(args.seed)
    samples = [sample(model, ledger, 0, t0, None)]
    print_header(samples[0])
    print_row(samples[0])
    if args.style == "chunks":
        for k in range(steps // every):
            ids = torch.randint(0, spec.vocab_size, (args.batch, prompt), generator=gen_ids)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, every)
            if device == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t) * 1e3 / every  # the prompt's prefill included
            samples.append(sample(model, ledger, (k + 1) * every, t0, ms))
            print_row(samples[-1])
    else:
        ids = torch.randint(0, spec.vocab_size, (args.batch, prompt), generator=gen_ids)
        last = [time.perf_counter()]

        def on_token(step: int, _tokens) -> None:
            if step and step % every == 0:
                now = time.perf_counter()
                samples.append(sample(model, ledger, step, t0, (now - last[0]) * 1e3 / every))
                print_row(samples[-1])
                last[0] = time.perf_counter()  # the sample's own time is not the step's

        model.generate(ids, gen, on_token=on_token)
    model.close()
    after = sample(model, ledger, steps, t0, None)
    verdict = judge(samples, args.warmup)
    return {
        "what": "kvc soak (tools/soak.py)", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"host": platform.node(), "device": device,
                    "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
                    "torch": torch.__version__, "kvc": kvc.__version__},
        "config": config, "overrides": overrides, "style": args.style, "steps": steps, "every": every,
        "warmup_steps": args.warmup,
        "plan": {"mode": plan.mode, "units": plan.num_units, "offloaded_units": len(plan.offloaded_units),
                 "streamed_layers": len(plan.streamed_layers), "micro_batches": plan.micro_batches},
        "pinned": {"registered": ledger.registered, "released": ledger.released},
        "samples": samples, "after_close": after, "verdict": verdict,
    }


def judge(samples: list[dict], warmup: int) -> dict:
    """Per series: its growth from the first sample at or after `warmup` steps to the last,
    and whether that is within tolerance (TOLERANCE_MB, or a fraction of its size)."""
    warm = [s for s in samples if s["step"] >= warmup] or samples[-1:]
    out = {}
    for key, tol in TOLERANCE_MB.items():
        vals = [s[key] for s in warm if s.get(key) is not None and not math.isnan(s[key])]
        if len(vals) < 2:
            continue
        grew = vals[-1] - vals[0]
        allowed = max(tol, TOLERANCE_FRACTION * vals[0]) if tol else 0.0
        out[key] = {"first": vals[0], "last": vals[-1], "max": max(vals), "growth": round(grew, 1),
                    "allowed": round(allowed, 1), "flat": grew <= allowed}
    return out


COLUMNS = ("step", "t_s", "ms_per_step", "rss_mb", "hwm_mb", "pinned_mb", "pool_mb", "host_alloc_mb",
           "gpu_allocated_mb", "gpu_reserved_mb")


def print_header(row: dict) -> None:
    cols = [c for c in COLUMNS if c in row]
    print("  ".join(f"{c:>16}" for c in cols), flush=True)


def print_row(row: dict) -> None:
    cols = [c for c in COLUMNS if c in row]
    print("  ".join(f"{'-' if row[c] is None else row[c]:>16}" for c in cols), flush=True)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    keys = [k for k in ("rss_mb", "pinned_mb", "pool_mb", "gpu_allocated_mb", "gpu_reserved_mb") if k in s[0]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for k in keys:
        ax.plot([r["step"] for r in s], [r[k] for r in s], marker="o", ms=3, label=k)
    ax.axvline(result["warmup_steps"], color="#999", lw=0.8, ls="--")
    ax.set_xlabel("decode step")
    ax.set_ylabel("MiB")
    c = result["config"]
    ax.set_title(f"kvc soak: {c['model']['preset']} b{c['workload']['batch_size']} {c['schedule']['mode']} "
                 f"on {result['machine']['device_name']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="opt-6.7b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--mode", default="pipelined")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100, help="steps between samples (and per generate call)")
    ap.add_argument("--style", choices=["chunks", "long"], default="chunks")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=None,
                    help="steps before the series must be flat (default: 200, at most half the steps)")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--hardware", default=None, help="hardware preset (default: h200-pcie5 on cuda, cpu on cpu)")
    ap.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    ap.add_argument("--gpu-mem-gb", type=float, default=None, help="default: offload_budget_gb")
    ap.add_argument("--override", action="append", default=[], help="more kvc overrides, repeatable")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--artifact", default=None, help="where to compile the artifact")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/soak-....json)")
    ap.add_argument("--plot", default=None, metavar="PNG", help="draw the memory curves (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.batch < 1:
        ap.error("--steps, --every and --batch must be >= 1")
    if args.warmup is None:
        args.warmup = min(200, args.steps // 2 // args.every * args.every)
    result = run(args)
    device = result["machine"]["device"]
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"soak-{args.preset}-b{args.batch}-{args.mode}-{args.style}-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    if args.plot:
        plot(result, Path(args.plot))
    print(f"\nafter close: pinned {result['after_close']['pinned_mb']} MB, pools {result['after_close']['pool_mb']} MB, "
          f"RSS {result['after_close']['rss_mb']} MB; cudaHostRegister {result['pinned']['registered']}x, "
          f"unregistered {result['pinned']['released']}x")
    print(f"verdict after {args.warmup} warm-up steps (growth from the first sample after it to the last):")
    if not result["verdict"]:
        print("  too few samples after the warm-up to judge: more --steps, or a smaller --warmup")
    for key, v in result["verdict"].items():
        print(f"  {key:<17} {v['first']:>10} -> {v['last']:>10} MB  (+{v['growth']}, allowed {v['allowed']})  "
              f"{'flat' if v['flat'] else 'GROWS'}")
    print(f"soak: wrote {out}" + (f" and {args.plot}" if args.plot else ""))
    return 0 if all(v["flat"] for v in result["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
