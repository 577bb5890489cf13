"""Timing a decode step: the whole step (host running ahead as in use) and the host's share."""
from __future__ import annotations

import math
import statistics
import time

import torch

from .env import GEN_LEN, sync


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
