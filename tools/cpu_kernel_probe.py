#!/usr/bin/env python
"""Which CPU attention kernel and layout read one layer's K,V fastest (issue 17), and does a
GPU stream wait on a flag the host writes (cuStreamWaitValue32), so the host need not block.

    python tools/cpu_kernel_probe.py --out DIR [--threads 14,16] [--dma]

Per point (a layer's K,V at batch b, context s), per dtype and thread count, the median ms of:
  tm-flash   torch's CPU flash attention over the token-major pool [s, b, kv, hd], in place
  hm-flash   the same over a head-major copy [b, kv, s, hd] (contiguous per head)
  hm-mm      two matmuls + softmax over the head-major copy
  blk-flash  blocked [s/T, b, kv, T, hd]: flash per block (blocks as batch), merged by lse
  read       a plain read of the same bytes (x.view(int64).sum()): the memory's rate
  hm-append  building the head-major copy from the token-major pool (the conversion cost)
With --dma, each kernel row is also taken while a pinned->GPU copy loop runs beside it, and
the copy's GB/s is reported (what the lane and the link get when they share host memory).
Rows are appended to DIR/cpu-kernel-probe.jsonl as they are measured.

`--wait-value` runs only the flag-wait probe. On the H200 machine (2026-11-29) it HUNG in two
calls (the stream never saw the host's write to pinned torch memory): run it last, in its own
`timeout`, e.g. `timeout 25 python tools/cpu_kernel_probe.py --wait-value`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from kvc.profiler.cpu_lane import CopyLoop, median_s


LOG = None
REPS = 7


def med_ms(fn):
    return median_s(fn, REPS) * 1e3


def flash(q, k, v, scale):
    """q [B, kv, g, hd], k/v [B, kv, c, hd] -> out, lse (float)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out, lse


def mm(q, k, v, scale):
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p.to(v.dtype), v).float(), lse


def blk_flash(q, kb, vb, scale):
    """kb/vb [nb, b, kv, T, hd]; q [b, kv, g, hd]."""
    nb, b, kv, T, hd = kb.shape
    qq = q.unsqueeze(0).expand(nb, *q.shape).reshape(nb * b, kv, q.shape[2], hd)
    out, lse = flash(qq, kb.reshape(nb * b, kv, T, hd), vb.reshape(nb * b, kv, T, hd), scale)
    out, lse = out.float().reshape(nb, b, kv, -1, hd), lse.float().reshape(nb, b, kv, -1)
    m = torch.logsumexp(lse, 0)
    w = torch.exp(lse - m)
    return (out * w[..., None]).sum(0), m


def probe_point(name, b, s, kv, h, hd, dtypes, threads, dma, T_list):
    rows = []
    pin = torch.cuda.is_available()
    for dtype in dtypes:
        k = torch.randn(s, b, kv, hd).to(dtype)
        v = torch.randn(s, b, kv, hd).to(dtype)
        if pin:
            k, v = k.pin_memory(), v.pin_memory()
        nbytes = 2 * k.nbytes
        q = torch.randn(b, kv, h // kv, hd).to(dtype)
        scale = hd ** -0.5
        hm_k = torch.empty(b, kv, s, hd, dtype=dtype)
        hm_v = torch.empty_like(hm_k)

        def append():
            hm_k.copy_(k.permute(1, 2, 0, 3))
            hm_v.copy_(v.permute(1, 2, 0, 3))
        append()
        ref_out, ref_lse = mm(q.float(), hm_k.float(), hm_v.float(), scale)
        kernels = {
            "tm-flash": lambda: flash(q, k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), scale),
            "hm-flash": lambda: flash(q, hm_k, hm_v, scale),
            "hm-mm": lambda: mm(q, hm_k, hm_v, scale),
            "read": lambda: (k.view(torch.int64).sum(), v.view(torch.int64).sum()),
            "hm-append": append,
        }
        if dtype != torch.float32:
            kernels["hm-mm-f32"] = lambda: mm(q.float(), hm_k.float(), hm_v.float(), scale)
        for T in T_list:
            if s % T:
                continue
            kb = hm_k.reshape(b, kv, s // T, T, hd).permute(2, 0, 1, 3, 4).contiguous()
            vb = hm_v.reshape(b, kv, s // T, T, hd).permute(2, 0, 1, 3, 4).contiguous()
            kernels[f"blk{T}-flash"] = (lambda kb=kb, vb=vb: blk_flash(q, kb, vb, scale))
        for kname, fn in kernels.items():
            if kname not in ("read", "hm-append"):
                out = fn()
                o = out[0].float().reshape(ref_out.shape)
                err = (o - ref_out).abs().max().item()
            else:
                err = 0.0
            for th in threads:
                torch.set_num_threads(th)
                ms = med_ms(fn)
                row = {"point": name, "dtype": str(dtype)[6:], "kernel": kname, "threads": th,
                       "mb": round(nbytes / 1e6, 1), "ms": round(ms, 3), "gbps": round(nbytes / ms / 1e6, 1),
                       "max_err": round(err, 5)}
                if dma and kname in ("tm-flash", "hm-flash", "hm-mm", "read") or (dma and kname.startswith("blk")):
                    with CopyLoop(torch.device("cuda"), 1 << 30) as d:
                        ms2 = med_ms(fn)
                    row.update(ms_dma=round(ms2, 3), gbps_dma=round(nbytes / ms2 / 1e6, 1), dma_gbps=round(d.gbps, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
                if LOG:
                    with open(LOG, "a") as f:
                        f.write(json.dumps(row) + "\n")
    torch.set_num_threads(os.cpu_count())
    return rows


def wait_value_probe():
    """Does a stream wait for a host-written flag? Returns a dict of what happened."""
    import ctypes
    res = {}
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return {"error": str(e)}
    torch.cuda.init()
    x = torch.ones(1 << 20, device="cuda")
    flag = torch.zeros(4, dtype=torch.int32, pin_memory=True)
    dptr = ctypes.c_uint64()
    r = cu.cuMemHostGetDevicePointer_v2(ctypes.byref(dptr), ctypes.c_void_p(flag.data_ptr()), 0)
    res["getdeviceptr_rc"] = r
    res["same_address"] = dptr.value == flag.data_ptr()
    attr = ctypes.c_int()
    for nm, code in (("STREAM_MEM_OPS_V1", 92), ("WAIT_VALUE_NOR", 121)):
        cu.cuDeviceGetAttribute(ctypes.byref(attr), code, 0)
        res[nm] = attr.value
    fn = cu.cuStreamWaitValue32_v2
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    st = torch.cuda.Stream()
    r = fn(ctypes.c_void_p(st.cuda_stream), ctypes.c_uint64(flag.data_ptr()), 1, 0)
    res["wait_rc"] = r
    with torch.cuda.stream(st):
        y = x * 2
    e = torch.cuda.Event()
    e.record(st)
    time.sleep(0.1)
    res["done_before_flag"] = e.query()
    t0 = time.perf_counter()
    flag[0] = 1
    e.synchronize()
    res["latency_after_flag_us"] = round((time.perf_counter() - t0) * 1e6, 1)
    res["value_ok"] = bool((y == 2).all().item())
    # overhead: 200 waits already satisfied
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        fn(ctypes.c_void_p(st.cuda_stream), ctypes.c_uint64(flag.data_ptr()), 1, 0)
    st.synchronize()
    res["wait_issue_us"] = round((time.perf_counter() - t0) / 200 * 1e6, 2)
    # round trip: worker thread writes flag after a sleep; time from write to GPU progress
    lat = []
    for i in range(2, 22):
        fn(ctypes.c_void_p(st.cuda_stream), ctypes.c_uint64(flag.data_ptr()), i, 0)
        e.record(st)
        time.sleep(0.002)
        t0 = time.perf_counter()
        flag[0] = i
        e.synchronize()
        lat.append((time.perf_counter() - t0) * 1e6)
    res["flag_to_event_us_median"] = round(statistics.median(lat), 1)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", default="14,16,8")
    ap.add_argument("--dma", action="store_true")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--wait-value", action="store_true", help="only the flag-wait probe")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    info = {}
    for cmd in ("lscpu", "cat /sys/kernel/mm/transparent_hugepage/enabled", "numactl -H",
                "which g++ gcc cc ninja", "nproc", "free -g"):
        try:
            info[cmd] = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout[-3000:]
        except Exception as e:  # noqa: BLE001
            info[cmd] = str(e)
    print(json.dumps(info, indent=1))
    threads = [int(t) for t in a.threads.split(",")]
    global LOG, REPS
    REPS = a.reps
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        LOG = str(Path(a.out) / "cpu-kernel-probe.jsonl")
    cuda = torch.cuda.is_available()
    dtypes = [torch.float16, torch.bfloat16] if cuda else [torch.float32, torch.bfloat16]
    points = [("llama-3-8b b32 s2048", 32, 2048, 8, 32, 128), ("opt-6.7b b32 s1024", 32, 1024, 32, 32, 128)]
    if a.small:
        points = [("small", 4, 256, 2, 8, 64)]
    rows = []
    wv = {}
    if a.wait_value:
        wv = wait_value_probe() if cuda else {}
        print("wait_value", json.dumps(wv), flush=True)
        return
    for p in points:
        rows += probe_point(*p, dtypes, threads, a.dma and cuda, (64, 256))
    lines = ["| point | dtype | kernel | threads | MB | ms | GB/s | with DMA: ms | GB/s | DMA GB/s | max err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['point']} | {r['dtype']} | {r['kernel']} | {r['threads']} | {r['mb']} | {r['ms']} | "
                     f"{r['gbps']} | {r.get('ms_dma', '')} | {r.get('gbps_dma', '')} | {r.get('dma_gbps', '')} | {r['max_err']} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cpu-kernel-probe.md").write_text(text + "\n\nwait_value: " + json.dumps(wv) + "\n")
        (out / "cpu-kernel-probe.json").write_text(json.dumps({"info": info, "rows": rows, "wait_value": wv}, indent=1))


if __name__ == "__main__":
    main()
