#!/usr/bin/env python
"""Does a module load on the host thread, while a flag poll waits on the GPU, deadlock with a
worker thread that calls CUDA? (issue 17, session 11's stall; kvc.runtime.flagwait)

Per case: the compute stream gets a poll of flag 0 (timeout `--timeout` s); a worker thread
sleeps 0.2 s, then (case "worker calls CUDA") synchronizes a CUDA event that completed long
ago, then posts the flag; meanwhile the host thread loads a module: an NVRTC kernel it never
compiled ("nvrtc"), or a torch kernel this process never ran ("lazy torch kernel"). Under lazy
loading the load waits, holding the context's lock, for the GPU's queued work (the poll) to
drain. Prints, per case, how long until everything ended and whether the poll gave up:
a deadlock shows as ~timeout s with the poll given up.

    python tools/lane_lazy_load_probe.py [--timeout 5]
"""
import argparse
import os
import threading
import time

import torch

from kvc.runtime import flagwait

KERNELS = iter([lambda x: torch.special.bessel_j1(x), lambda x: torch.special.bessel_y0(x),
                lambda x: torch.special.modified_bessel_i0(x), lambda x: torch.special.scaled_modified_bessel_k1(x)])


def case(worker_calls_cuda: bool, load: str) -> dict:
    flags, stream = flagwait.FlagWait(1), torch.cuda.current_stream()
    done = torch.cuda.Event(blocking=True)
    done.record()
    torch.cuda.synchronize()
    flags.wait(0, 1, stream)
    stamps = {}

    def worker():
        time.sleep(0.2)
        if worker_calls_cuda:
            done.synchronize()  # complete long ago: returns at once unless the lock is held
        stamps["posted"] = time.perf_counter()
        flags.post(0, 1)
    t0 = time.perf_counter()
    th = threading.Thread(target=worker)
    th.start()
    if load == "nvrtc":
        name = f"kvc_probe_{time.time_ns() % 10**9}"
        k = torch.cuda._compile_kernel(f'extern "C" __global__ void {name}(int* x) {{ *x += 1; }}', name)
        k(grid=(1, 1, 1), block=(1, 1, 1), args=[torch.zeros(1, dtype=torch.int32, device="cuda")])
    else:
        next(KERNELS)(torch.ones(8, device="cuda"))
    loaded = time.perf_counter()
    torch.cuda.synchronize()
    th.join()
    end = time.perf_counter()
    return {"worker": "calls CUDA" if worker_calls_cuda else "no CUDA", "load": load,
            "load_s": round(loaded - t0, 3), "posted_s": round(stamps["posted"] - t0, 3),
            "all_s": round(end - t0, 3), "poll_gave_up": flags.timed_out() is not None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    flagwait.TIMEOUT_S = args.timeout
    assert flagwait.available(), "no NVRTC flag poll on this machine"
    print(f"CUDA_MODULE_LOADING={os.environ.get('CUDA_MODULE_LOADING', '(unset: lazy)')}, "
          f"torch {torch.__version__}, {torch.cuda.get_device_name()}, poll timeout {args.timeout} s")
    print("| worker | module loaded | load returned (s) | flag posted (s) | all done (s) | poll gave up |")
    print("|---|---|---|---|---|---|")
    for calls in (False, True):
        for load in ("nvrtc", "lazy torch kernel"):
            r = case(calls, load)
            print(f"| {r['worker']} | {r['load']} | {r['load_s']} | {r['posted_s']} | {r['all_s']} | "
                  f"{r['poll_gave_up']} |", flush=True)


if __name__ == "__main__":
    main()
