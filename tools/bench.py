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
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from kvc.planner import cost  # noqa: E402
from kvc.config import load_config  # noqa: E402
from kvc.api import make_plan, resolve  # noqa: E402
from kvc.ir.request import PlanRequest  # noqa: E402
from kvc.compiler.lowering import lower  # noqa: E402
from kvc.models import build_model, preset  # noqa: E402
from kvc.runtime.reference import ReferenceDecoder  # noqa: E402
from kvc.ir.graph import host_kinds  # noqa: E402
from kvc.api import assemble  # noqa: E402
from kvc.runtime.weights import place_streamed  # noqa: E402
from kvc.planner.scheduler import host_memory_gb, predict, search_policy  # noqa: E402
from kvc.errors import KvcError  # noqa: E402

MODES = ("gpu_resident", "full_offload", "kvpr", "pipelined")
# max |logit - reference logit| allowed: fp16 gets 4 units in the last place of the largest
# logit (at least 2e-2): a micro-batch's GEMMs have b/m rows, so cuBLAS may pick another
# kernel and accumulation order than the reference's b-row GEMM, and round differently
LOGIT_TOL = {"float16": 2e-2, "float32": 1e-5}


def logit_tol(dtype_name: str, max_abs_logit: float) -> float:
    if dtype_name != "float16":
        return LOGIT_TOL[dtype_name]
    return max(LOGIT_TOL[dtype_name], 4 * 2.0 ** (math.floor(math.log2(max(max_abs_logit, 1e-3))) - 10))
GRIDS = {
    "smoke": [("tiny-opt", 2, 32), ("tiny-llama", 2, 32)],
    "quick": [("opt-1.3b", 8, 512)],
    "main": [("opt-6.7b", 32, 1024)],
    # the grid; the points most worth having first, in case a run is cut short
    "full": [("opt-6.7b", 32, 1024), ("llama-3-8b", 32, 2048), ("opt-13b", 32, 1024),
             ("opt-6.7b", 8, 512), ("llama-2-7b", 32, 2048), ("opt-6.7b", 8, 1024),
             ("opt-6.7b", 32, 1536), ("llama-2-7b", 32, 3584), ("opt-6.7b", 8, 1536),
             ("opt-6.7b", 32, 512)],
}
GEN_LEN = 32
# issue 6: FlexGen's throughput setting (weights, cache and activations all in CPU memory:
# --percent 0 100 0 100 0 100), prompt 256, gen 32, each mode at the batch and micro-batch
# count its policy search predicts fastest among those that fit. (model, gpu_mem_gb or None
# for the card's memory)
THROUGHPUT = {"throughput": [("opt-13b", None), ("opt-30b", None), ("opt-30b", 24.0)],
              "throughput-13b": [("opt-13b", None)],
              "throughput-30b": [("opt-30b", None), ("opt-30b", 24.0)],
              "throughput-30b-24gb": [("opt-30b", 24.0)],
              "throughput-smoke": [("tiny-opt", None)]}
TP_PROMPT = 256
TP_BATCHES = (16, 32, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
TP_MICRO = (1, 2, 4, 8)
HOST_GB = 110.0  # of the machine's 128 GiB: room for the process, the model build and the OS
DEVICE = "cuda"  # --device cpu: a smoke test of this script on a machine without CUDA
# hardware overrides for every plan of the run: the host lane's per-node costs as
# kvc.profiler.host_us measures them on this machine at the start of the run (the host of a
# lent machine differs from lease to lease; the card's preset cannot know it)
HOST_OVERRIDES: list[str] = []
# schedule.cuda_graphs of the latency rows (--cuda-graphs): each value is its own row
GRAPHS: list[bool] = [True]
DTYPE, DTYPE_NAME = torch.float16, "float16"


def card_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def card_preset() -> str:
    if DEVICE != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name()
    return "h200-pcie5" if "H200" in name else "h100-pcie5"


def offload_budget_gb(spec, hw, batch: int, s_max: int) -> float:
    """A GPU budget with room for the weights, the staging buffers, workspace and margin, and
    half a layer's KV cache more: no layer's cache fits, every mode streams all of it."""
    t = cost.memory_terms(spec, hw, batch, s_max, DTYPE_NAME, 2, True)
    need = t["weights_gb"] + t["staging_gb"] + t["workspace_gb"] + t["margin_gb"]
    return math.ceil((need + 0.5 * t["layer_kv_gb"]) * 1000) / 1000


def free_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        empty_host = getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:  # pinned pools are cached by torch: give them back
            empty_host()


def planned(name, mode, batch, context, hw_name, budget, fraction=None, extra=()):
    """(plan, resolved config) of one bench row: the card's preset with this run's host costs."""
    overrides = [f"hardware={hw_name}", f"schedule.mode={mode}",
                 f"workload.batch_size={batch}", f"workload.prompt_len={context}",
                 f"workload.gen_len={GEN_LEN}", f"hardware.gpu_mem_gb={budget}", *HOST_OVERRIDES, *extra]
    if fraction is not None:
        overrides.append(f"schedule.recompute_fraction={fraction}")
    r = resolve(load_config({"model": {"preset": name, "dtype": DTYPE_NAME}}, overrides))
    return make_plan(r), r


def point_budget_gb(spec, name, hw_name, batch, context) -> float:
    """The offloading modes' GPU budget at a grid point (offload_budget_gb on the preset)."""
    hw = resolve(load_config({"model": {"preset": name}}, [f"hardware={hw_name}", *HOST_OVERRIDES])).hardware
    return offload_budget_gb(spec, hw, batch, context + GEN_LEN)


def compiled(model, spec, mode, batch, context, hw_name, budget, fraction=None, extra=()):
    plan, r = planned(spec_name(spec), mode, batch, context, hw_name, budget, fraction, extra)
    return assemble(lower(model, plan), plan, spec, DTYPE, torch.device(DEVICE)), r


_names: dict = {}


def spec_name(spec) -> str:
    return _names[id(spec)]


def get_spec(name):
    spec = preset(name)
    _names[id(spec)] = name
    return spec


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


class StepHost:
    """Wraps a lowered decode graph. `idle`: each call starts on an idle GPU (a sync first),
    and `times` holds the host wall time of each call, i.e. what the host spends issuing the
    step's nodes while the GPU keeps up. `first`: a sync before the first call only, whose
    end `start` records: decode steps timed from there never overlap the prefill. `mark`:
    each call is a profiler range ending with a sync, so one step's kernels lie inside it."""

    def __init__(self, fn, mark: bool = False, idle: bool = False, first: bool = False):
        self.fn, self.mark, self.idle, self.first, self.times = fn, mark, idle, first, []
        self.start = None

    def __call__(self, *args):
        if self.idle or (self.first and self.start is None):
            sync()
            self.start = time.perf_counter()
        t0 = time.perf_counter()
        if self.mark:
            with torch.profiler.record_function("kvc_decode_step"):
                out = self.fn(*args)
                sync()
        else:
            out = self.fn(*args)
        self.times.append(time.perf_counter() - t0)
        return out


def with_step_hook(cm, hook: StepHost, fn):
    decode = cm.decode_step
    cm.decode_step = hook
    try:
        return fn()
    finally:
        cm.decode_step = decode


def host_ms(cm, ids, steps: int) -> float:
    """Median host time of one decode graph call started on an idle GPU."""
    hook = StepHost(cm.decode_step, idle=True)
    with_step_hook(cm, hook, lambda: cm.generate(ids, 1 + steps))
    return statistics.median(hook.times) * 1e3


def compiled_decode_ms(cm, ids, steps: int, repeats: int) -> float:
    """generate(1 + steps), timed from the first decode step (the prefill done: a sync) to the
    end (a sync), per step; median of `repeats`, after a warm-up. The host runs ahead of the
    GPU between steps exactly as in use, but never hides its own time behind the prefill."""
    cm.generate(ids, 3)  # warm-up: allocator, kernels, pinned pools, CUDA graph capture (step 2)
    times = []
    for _ in range(repeats):
        hook = StepHost(cm.decode_step, first=True)
        with_step_hook(cm, hook, lambda: cm.generate(ids, 1 + steps))
        sync()
        times.append((time.perf_counter() - hook.start) / steps)
    return statistics.median(times) * 1e3


def decode_ms(gen, ids, steps: int, repeats: int) -> float:
    """For a generate we cannot hook (transformers): (generate(1 + steps) - generate(1)) /
    steps. The host's issue time of the first decode steps hides behind the prefill here."""
    gen(ids, 2)  # warm-up: allocator, kernels, pinned pools
    full = [timed(lambda: gen(ids, 1 + steps)) for _ in range(repeats)]
    pre = [timed(lambda: gen(ids, 1)) for _ in range(repeats)]
    return (statistics.median(full) - statistics.median(pre)) / steps * 1e3


def steps_for(predicted_ms: float, least: int) -> int:
    """Decode steps per timing: at least `least`, and about 1 s of them (a fast step is
    timed over more steps), within the plan's gen_len."""
    return max(least, min(GEN_LEN - 1, math.ceil(1000.0 / max(predicted_ms, 1e-3))))


# --- correctness ---------------------------------------------------------------------------

def _scaled_model(spec):
    model = build_model(spec, DEVICE, DTYPE, seed=0)
    with torch.no_grad():  # wider weights: greedy choices with clear margins
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def check(names, hw_name, steps=32, log=print) -> list[dict]:
    """Greedy tokens equal and fp16 logits close to the reference, every mode, on the GPU."""
    rows = []
    for name in names:
        spec = get_spec(name)
        model = _scaled_model(spec)
        ids = torch.randint(0, spec.vocab_size, (4, 64), device=DEVICE,
                            generator=torch.Generator(DEVICE).manual_seed(0))
        ref = ReferenceDecoder(model, spec)
        refs = {m: ref.generate_in_micro_batches(ids, steps, m, return_logits=True) for m in (1, 2)}
        variants = [(mode, frac, ()) for mode in MODES
                    for frac in ((None, 0.5, 1.0) if mode in ("kvpr", "pipelined") else (None,))]
        # the block schedule with every layer's weights streamed (issue 6)
        tp = ("workload.num_gpu_batches=2", "schedule.weight_stream_fraction=1")
        variants += [(mode, frac, tp) for mode, frac in
                     (("full_offload", None), ("kvpr", 0.5), ("pipelined", None), ("pipelined", 1.0))]
        for mode, frac, extra in variants:
            # a weight-streaming model takes the parameters over: build one per variant
            m = model if not extra else _scaled_model(spec)
            cm, _ = compiled(m, spec, mode, 4, 64, hw_name, 1000.0, frac, extra)
            t, l = cm.generate(ids, steps, return_logits=True)
            # the block schedule against the reference on the same micro-batches: fp16 GEMMs of
            # b/m rows round differently than of b rows (ReferenceDecoder.generate_in_micro_batches)
            ref_t, ref_l = refs[cm.plan.micro_batches]
            cm.close()
            del cm
            err = (l - ref_l.float()).abs().max().item()
            scale = ref_l.float().abs().max().item()
            same = bool(torch.equal(t, ref_t))
            rows.append({"model": name, "mode": mode, "fraction": frac, "tokens_equal": same,
                         "variant": " ".join(extra),
                         "max_abs_logit_err": err, "max_abs_logit": scale,
                         "logit_tol": logit_tol(DTYPE_NAME, scale),
                         "logits_within_tol": err <= logit_tol(DTYPE_NAME, scale)})
            log(f"check {name:10s} {mode:13s} frac={frac} {' '.join(extra)}: tokens_equal={same} "
                f"max|dlogit|={err:.3e} (max|logit| {scale:.1f})")
        del model
        free_memory()
    return rows


# --- timing --------------------------------------------------------------------------------

def bench_point(name, batch, context, hw_name, steps, repeats, with_hf, log=print,
                profile_dir=None, modes=MODES) -> list[dict]:
    spec = get_spec(name)
    model = build_model(spec, DEVICE, DTYPE, seed=0)
    ids = torch.randint(0, spec.vocab_size, (batch, context), device=DEVICE)
    budget = point_budget_gb(spec, name, hw_name, batch, context)
    card_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if DEVICE == "cuda" else 64.0
    rows = []
    for mode, graphs in [(m, g) for m in modes for g in GRAPHS]:
        try:
            cm, r = compiled(model, spec, mode, batch, context, hw_name,
                             card_gb if mode == "gpu_resident" else budget,
                             extra=(f"schedule.cuda_graphs={str(graphs).lower()}",))
        except KvcError as e:
            log(f"{name} b={batch} s={context} {mode}: skipped ({e})")
            continue
        n = steps_for(predict(spec, r.hardware, cm.plan, context, batch, DTYPE_NAME)["predicted_step_ms"], steps)
        try:
            ms = compiled_decode_ms(cm, ids, n, repeats)
        except torch.OutOfMemoryError as e:
            log(f"{name} b={batch} s={context} {mode}: out of memory ({str(e)[:80]})")
            cm.close()
            free_memory()
            continue
        host = host_ms(cm, ids, min(n, 4))
        pred = predict(spec, r.hardware, cm.plan, context + n // 2, batch, DTYPE_NAME)
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


def throughput_point(name, gpu_gb, hw_name, log=print,
                     modes=("full_offload", "kvpr", "pipelined")) -> list[dict]:
    """FlexGen's setting (issue 6): every layer's weights and KV cache in pinned CPU memory,
    prompt TP_PROMPT, gen GEN_LEN. Each mode runs at the (batch, micro-batches) its policy
    search (kvc.planner.scheduler.search_policy: the LP inside) predicts fastest within the GPU budget
    and HOST_GB of host memory. Timed: generate(n=1) (prefill) and generate(n=GEN_LEN), once
    each after a warm-up; decode throughput = batch * (GEN_LEN - 1) / (their difference), total
    throughput = batch * GEN_LEN / the whole generate."""
    spec = get_spec(name)
    card_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if DEVICE == "cuda" else 64.0
    budget = gpu_gb or round(card_gb, 1)
    overrides = [f"hardware={hw_name}", f"hardware.gpu_mem_gb={budget}", f"hardware.cpu_mem_gb={HOST_GB}",
                 *HOST_OVERRIDES]
    hw = resolve(load_config({"model": {"preset": name}}, overrides)).hardware
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        try:
            req = PlanRequest(batch_size=1, prompt_len=TP_PROMPT, gen_len=GEN_LEN, dtype=DTYPE_NAME,
                              mode=mode, weight_stream_fraction=1.0, resident_cache=False,
                              cuda_graphs=GRAPHS[-1])
            plan, pred_tps = search_policy(spec, hw, req, batch_sizes=TP_BATCHES,
                                           micro_batches=TP_MICRO)
        except KvcError as e:
            log(f"{name} throughput gpu={budget} {mode}: nothing fits ({e})")
            continue
        b, m = plan.batch_size, plan.micro_batches
        search_s = time.perf_counter() - t0
        # streamed parameters are drawn straight into the pinned pool: the GPU holds only the
        # resident weights and the weight slots, never the whole model
        model = build_model(spec, DEVICE, DTYPE, seed=0, place=place_streamed(plan, DEVICE))
        cm = assemble(lower(model, plan), plan, spec, DTYPE, torch.device(DEVICE))
        del model  # the compiled model holds the parameters, now in its pinned weight pool
        free_memory()
        ids = torch.randint(0, spec.vocab_size, (b, TP_PROMPT), device=DEVICE)
        try:
            cm.generate(ids, 3)  # warm-up: pools, kernels, CUDA graph capture
            pre = timed(lambda: cm.generate(ids, 1))
            whole = timed(lambda: cm.generate(ids, GEN_LEN))
        except torch.OutOfMemoryError as e:
            log(f"{name} throughput {mode} b={b} m={m}: out of memory ({str(e)[:80]})")
            cm.close()
            del cm
            free_memory()
            continue
        decode = whole - pre
        steps = GEN_LEN - 1
        pred_ms = sum(plan.predicted_step_ms[:steps]) / steps
        moved = predict(spec, hw, plan, TP_PROMPT + steps // 2, b, DTYPE_NAME)["h2d_bytes"]
        rows.append({
            "model": name, "batch": b, "context": TP_PROMPT, "setting": "throughput", "mode": mode,
            "cuda_graphs": plan.cuda_graphs,
            "micro_batches": m, "gpu_mem_gb_budget": budget, "cpu_mem_gb_budget": HOST_GB,
            "decode_ms_per_token": round(decode / steps * 1e3, 3), "predicted_ms": round(pred_ms, 3),
            "decode_tokens_per_s": round(b * steps / decode, 2),
            "total_tokens_per_s": round(b * GEN_LEN / whole, 2),
            "predicted_decode_tokens_per_s": round(b * 1e3 / pred_ms, 2),
            "prefill_s": round(pre, 3), "bytes_per_step": int(moved),
            "host_pinned_gb": round(host_memory_gb(spec, plan, b, DTYPE_NAME), 2),
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


# attention first: flash kernels' template arguments name cutlass types
KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "efficient")),
                ("gemm", ("gemm", "nvjet", "cutlass", "sm90_", "xmma", "cublas")),
                ("copy", ("memcpy", "memset")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KERNEL_KINDS if any(key in low for key in keys)), "elementwise")


def profile_step(cm, ids, path: Path, log) -> dict:
    """torch.profiler trace of generate(3) with each decode step synchronised at its end, so
    the second decode step's GPU work lies inside its own range. Returns that step's wall time
    and, per CUDA stream, its busy ms by kind (gemm, attention, elementwise, copy); the trace
    is kept as Chrome JSON when small enough to bring back."""
    from torch.profiler import ProfilerActivity, profile

    def run():
        cm.generate(ids, 2)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            cm.generate(ids, 3)
        return p

    prof = with_step_hook(cm, StepHost(cm.decode_step, mark=True), run)
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    steps = [e for e in events if e.get("name") == "kvc_decode_step" and e.get("ph") == "X"
             and e.get("cat") != "gpu_user_annotation"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not steps or not gpu:
        return {}
    last = max(steps, key=lambda e: e["ts"])
    t0, t1 = last["ts"], last["ts"] + last["dur"]
    out: dict = {"step_ms": round(last["dur"] / 1e3, 3)}
    by_name: dict = {}
    for e in gpu:
        if not t0 <= e["ts"] < t1:
            continue
        by_name[e.get("name", "?")[:80]] = by_name.get(e.get("name", "?")[:80], 0.0) + e["dur"] / 1e3
        kind = "copy" if e["cat"] != "kernel" else kernel_kind(e.get("name", ""))
        stream = out.setdefault(f"stream_{e.get('args', {}).get('stream', '?')}", {})
        stream[kind] = round(stream.get(kind, 0.0) + e["dur"] / 1e3, 3)
    out["top_kernels_ms"] = {k: round(v, 3) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:6]}
    # host side: the step's CPU ops by total time (what the host spends issuing it)
    cpu = {}
    for e in events:
        if e.get("cat") == "cpu_op" and t0 <= e.get("ts", -1) < t1 and "dur" in e:
            cpu[e["name"][:60]] = cpu.get(e["name"][:60], 0.0) + e["dur"] / 1e3
    out["top_cpu_ops_ms"] = {k: round(v, 3) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])[:8]}
    log(f"  profile {path.name}: {out}")
    if path.stat().st_size > 15e6:
        path.unlink()  # too big to bring back; the numbers above stay
    return out


def hf_config(spec):
    import transformers

    if spec.family == "opt":
        return transformers.OPTConfig(
            vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, ffn_dim=spec.intermediate_size,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            max_position_embeddings=spec.max_positions, word_embed_proj_dim=spec.word_embed_proj_dim,
            do_layer_norm_before=spec.do_layer_norm_before)
    return transformers.LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_positions,
        rope_theta=spec.rope_theta)


def hf_offloaded(name, spec, batch, context, steps, log) -> list[dict]:
    """Transformers' own offloaded KV cache on the same shape (random weights)."""
    import transformers

    cfg = hf_config(spec)
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = None
    ids = torch.randint(0, spec.vocab_size, (batch, context), device="cuda")

    def gen(x, n):
        with torch.inference_mode():
            return model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  cache_implementation="offloaded")

    ms = decode_ms(gen, ids, steps, 1)
    log(f"{name} b={batch} s={context} hf_offloaded  {ms:8.2f} ms/token "
        f"(transformers {transformers.__version__})")
    del model
    free_memory()
    kv = cost.kv_bytes(spec, batch, context, 2) * spec.num_layers
    return [{"model": name, "batch": batch, "context": context, "setting": "latency",
             "mode": "hf_offloaded", "decode_ms_per_token": round(ms, 3), "predicted_ms": None,
             "decode_tokens_per_s": round(batch * 1e3 / ms, 2), "bytes_per_step": int(kv),
             "link_utilization": None}]


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
    GRAPHS[:] = {"on": [True], "off": [False], "both": [False, True]}[args.cuda_graphs]
    global DEVICE, DTYPE, DTYPE_NAME
    DEVICE = args.device
    DTYPE, DTYPE_NAME = (torch.float16, "float16") if DEVICE == "cuda" else (torch.float32, "float32")
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

        host = {k: round(v, 2) for k, v in host_us(DEVICE, DTYPE).items()}
        HOST_OVERRIDES[:] = [f"hardware.{k}={v}" for k, v in host.items()]
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
