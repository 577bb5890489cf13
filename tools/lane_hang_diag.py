#!/usr/bin/env python
"""tools/lane_timing_probe.py with a watchdog, for a lane that may hang (issue 17, session 10).

    python tools/lane_hang_diag.py llama-3-8b:32:2048 pipelined 0.4 [seconds]

After `seconds` (default 100) without the probe ending: the lane's jobs (pending, in flight,
chores: done or not), its flags and the values the polls wait for, whether the compute
stream is idle, every Python thread's stack; then the process exits 3.
"""
import faulthandler
import os
import runpy
import sys
import threading
import time
from pathlib import Path

import torch

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
    for lane in lanes[-1:]:
        if lane.flags is not None:
            print("DIAG flags", lane.flags.flags.tolist(), "want", lane.seq, flush=True)
        print("DIAG pending", list(lane.pending), "inflight", [f.done() for f in lane.inflight],
              "chores", [f.done() for f in lane.chores], flush=True)
    print("DIAG compute idle", torch.cuda.default_stream().query(), flush=True)
    faulthandler.dump_traceback(all_threads=True)
    os._exit(3)


threading.Thread(target=watch, daemon=True).start()
probe = str(Path(__file__).with_name("lane_timing_probe.py"))
sys.argv = [probe, "--point", point, "--mode", mode, "--fraction", frac, "--steps", "4"]
runpy.run_path(probe, run_name="__main__")
