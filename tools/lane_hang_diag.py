#!/usr/bin/env python
"""tools/lane_timing_probe.py with a watchdog, for a lane that may hang (issue 17, session 10).

    python tools/lane_hang_diag.py llama-3-8b:32:2048 pipelined 0.4 [seconds]

After `seconds` (default 100) without the probe ending: the lane's jobs (pending, in flight,
chores: done or not), its flags of each kind and the values waited for, whether a poll gave
up, every Python thread's stack (all read without a CUDA call: a deadlock may hold the
context's lock); then the process exits 3.
"""
import faulthandler
import os
import runpy
import sys
import threading
import time
from pathlib import Path

import kvc.runtime.cpu_attention as ca

lanes = []
_init = ca.CpuLane.__init__


def _tracked(self, *a, **k):
    _init(self, *a, **k)
    lanes.append(self)


ca.CpuLane.__init__ = _tracked
point, mode, frac = sys.argv[1:4]
wait_s = float(sys.argv[4]) if len(sys.argv) > 4 else 100.0


def watch():
    time.sleep(wait_s)
    # no CUDA call here: a deadlock may hold the context's lock (host memory reads only)
    for lane in lanes[-1:]:
        if lane.flags is not None:
            n, f = lane.num_units, lane.flags.flags.tolist()
            for kind, name in zip(ca._KINDS, ("posted", "query", "landed", "prefilled")):
                print(f"DIAG flags {name}", f[kind * n:(kind + 1) * n], flush=True)
            print("DIAG want (seq)", lane.seq, "prefills", lane.prefills, flush=True)
            print("DIAG poll gave up:", lane.flags.timed_out(), flush=True)
        print("DIAG pending", list(lane.pending), "inflight", [f.done() for f in lane.inflight],
              "chores", [f.done() for f in lane.chores], flush=True)
    faulthandler.dump_traceback(all_threads=True)
    os._exit(3)


threading.Thread(target=watch, daemon=True).start()
probe = str(Path(__file__).with_name("lane_timing_probe.py"))
sys.argv = [probe, "--point", point, "--mode", mode, "--fraction", frac, "--steps", "4"]
runpy.run_path(probe, run_name="__main__")
