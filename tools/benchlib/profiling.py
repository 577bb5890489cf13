"""A torch.profiler trace of one decode step, summarised per CUDA stream and kernel kind."""
from __future__ import annotations

import json
from pathlib import Path

from .timing import StepHost, with_step_hook

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
