"""The guard of an auto plan's CPU attention lane: whether each decode step runs with the
lane, decided from the steps' own times.

The LP plans the lane with the host's rate as `kvc profile` measured it, which does not say
what the whole step costs: on the H200's host the lane's rate inside the steps moved between
12 and 40 GB/s from one process to the next (against the profiler's 42-52), and the same plan
ran 115 and 161 ms in one process while the plan without the lane ran 138 (session 13,
docs/BENCHMARKS.md). Scaling the lane's share down to the rate its parts ran at (sessions
12-13) lost to the LP's share kept at every point it ran (session 14: OPT-6.7B 156 against
134 ms, llama-3-8b 112 against 96): the parts' rate is not the step's. So the runtime
compares whole steps: it runs the decode in rounds of

    [the arm in use] x BLOCK, [the other arm] x BLOCK, [the arm in use] x wait

and after each round's two blocks have been timed keeps the arm whose median step was
faster (the first step of a block is not counted: it overlaps the last arm's work; the
median passes over one step that captured a CUDA graph for a new shape,
kvc.runtime.segments). The arm without the lane runs the plan the LP made before it added
the lane (Plan.bare, OffloadedCache._split): the plan `schedule.cpu_attention=off` gives,
except that a unit whose lane plan recomputes nothing copies all its tokens. `wait` is
EVERY, doubled each round the other arm loses again, up to EVERY x BACKOFF, and EVERY again
after a switch: an arm much slower than the other costs its extra time for BLOCK steps in
2 x BLOCK + 384, about 1% of the difference.

A step's time is the time from its start to the next step's start on the compute stream,
read from CUDA events once they have completed (the host never waits for one), or the host's
clock on a CPU. A new call's prefill restarts the chain (that step's time is not counted).
"""
from __future__ import annotations

import statistics
import time
from collections import deque

import torch

BLOCK = 4  # steps of one arm in a row; the first of each block is not timed
EVERY = 48  # steps of the arm in use between two probes of the other, at first
BACKOFF = 8  # at most EVERY x BACKOFF of them, while the other arm keeps losing


class StepClock:
    """Each decode step's time, from one `mark` (a step's start) to the next, in order, as
    soon as it is known: CUDA events on `stream` (timed once completed, no host wait), or
    the host's clock without one."""

    def __init__(self, stream: torch.cuda.Stream | None = None):
        self.stream = stream
        self.marks: deque = deque()  # (step, event or host time) not yet closed by a later mark
        self.done: list[tuple[int, float]] = []

    def mark(self, step: int) -> None:
        """Step `step` starts now (on the stream: after the work issued before it)."""
        if self.stream is None:
            self.marks.append((step, time.perf_counter()))
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.stream)
        self.marks.append((step, ev))

    def restart(self) -> list[int]:
        """A prefill comes next: the last step's time would include it. The steps whose
        times are lost so."""
        self._close()  # keep what has completed
        lost = [step for step, _ in self.marks]
        self.marks.clear()
        return lost

    def times(self) -> list[tuple[int, float]]:
        """(step, seconds) of the steps whose next step has started and, on a GPU, whose
        events have completed, since the last call."""
        self._close()
        got, self.done = self.done, []
        return got

    def _close(self) -> None:
        """Move the steps whose times are known from `marks` to `done`."""
        while len(self.marks) >= 2:
            (step, a), (_, b) = self.marks[0], self.marks[1]
            if self.stream is None:
                seconds = b - a
            elif b.query():
                seconds = a.elapsed_time(b) / 1e3
            else:
                break
            self.done.append((step, seconds))
            self.marks.popleft()


class LaneGuard:
    """Whether each decode step runs the lane: `step()` per decode step, in order."""

    def __init__(self, clock: StepClock, block: int | None = None, every: int | None = None):
        self.clock = clock
        self.block = BLOCK if block is None else block
        self.every = EVERY if every is None else every
        self.on = True  # the arm in use: the lane's (what the LP planned) to begin with
        self.n = 0  # decode steps so far
        # steps of the arm in use after the next round's blocks: `every`, doubled each time
        # the other arm loses again, up to every x BACKOFF (a probe of a much slower arm
        # costs its block's extra time once per round)
        self.wait = self.every
        self.round, self.start, self.length = -1, 0, 0  # the first step opens round 0
        self.arms: dict[int, tuple[int, bool]] = {}  # per step in a timed block: (round, arm)
        self.sums: dict[tuple[int, bool], list[float]] = {}  # per (round, arm): its steps' times
        self.blocks_end: dict[int, int] = {}  # per round: the step after its two blocks
        self.means: dict[bool, float] = {}  # per arm: its last timed block's median step time
        self.switches = 0

    def step(self) -> bool:
        """This decode step's arm (True: with the lane); marks its start."""
        self._settle()
        if self.n - self.start >= self.length:  # the next round
            self.round, self.start = self.round + 1, self.n
            self.length = 2 * self.block + self.wait
            self.blocks_end[self.round] = self.n + 2 * self.block
        k = self.n - self.start
        arm = self.on if k < self.block or k >= 2 * self.block else not self.on
        if 0 < k < 2 * self.block and k != self.block:  # a timed step of one of the two blocks
            self.arms[self.n] = (self.round, arm)
        self.clock.mark(self.n)
        self.n += 1
        return arm

    def restart(self) -> None:
        """A new call's prefill comes next."""
        for step in self.clock.restart():
            self.arms.pop(step, None)

    def _settle(self) -> None:
        """Count the steps timed since the last call; after a round's two blocks are in, keep
        the faster arm. A block that lost all its times (a prefill between) decides nothing."""
        for step, seconds in self.clock.times():
            got = self.arms.pop(step, None)
            if got is not None:
                self.sums.setdefault(got, []).append(seconds)
        for rnd in sorted({r for r, _ in self.sums}):
            issued = self.n >= self.blocks_end[rnd]  # both blocks' steps
            if not issued or any(r == rnd for r, _ in self.arms.values()):
                break
            for r in [r for r in self.blocks_end if r <= rnd]:  # and rounds that lost every time
                del self.blocks_end[r]
            both = [self.sums.pop((rnd, arm), None) for arm in (True, False)]
            if all(both):
                lane, bare = (statistics.median(t) for t in both)
                self.means = {True: lane, False: bare}
                keep = lane <= bare
                if keep != self.on:
                    self.switches, self.on, self.wait = self.switches + 1, keep, self.every
                else:
                    self.wait = min(2 * self.wait, BACKOFF * self.every)
