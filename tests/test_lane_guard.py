"""kvc.runtime.lane_guard: an auto plan's CPU lane runs only where the decode steps are faster
with it. The policy on a clock the test sets (which arm each step ran, what it cost, when its
time is known), the host clock, and the guard in a decode on the CPU whose lane is slow."""
import itertools
import time

import torch
from kvc_fixtures import guard_a_slow_lane

from kvc.runtime.lane_guard import LaneGuard, StepClock


class FakeClock:
    """Step i's time is cost[i], known `lag` marks after step i + 1 starts."""

    def __init__(self, lag: int = 0):
        self.lag, self.cost, self.marks, self.given = lag, {}, [], 0

    def mark(self, step):
        self.marks.append(step)

    def restart(self):
        lost, self.marks, self.given = self.marks[self.given:], [], 0
        return lost

    def times(self):
        known = max(self.given, len(self.marks) - 1 - self.lag)
        got = [(s, self.cost[s]) for s in self.marks[self.given:known]]
        self.given = known
        return got


def run(guard, clock, steps, cost):
    """Decode `steps` steps; cost(step, arm) -> seconds. The arms, in order."""
    arms = []
    for _ in range(steps):
        arm = guard.step()
        clock.cost[guard.n - 1] = cost(guard.n - 1, arm)
        arms.append(arm)
    return arms


def test_the_rounds_probe_the_other_arm_between_runs_of_the_one_in_use():
    clock = FakeClock()
    guard = LaneGuard(clock, block=2, every=3)
    arms = run(guard, clock, 14, lambda i, arm: 1.0)  # a tie keeps the lane
    T, F = True, False
    assert arms == [T, T, F, F, T, T, T] * 2
    assert guard.on and guard.switches == 0 and guard.means == {True: 1.0, False: 1.0}


def test_a_slower_lane_is_dropped_and_still_probed():
    clock = FakeClock()
    guard = LaneGuard(clock, block=3, every=5)
    arms = run(guard, clock, 33, lambda i, arm: 2.0 if arm else 1.0)
    assert not guard.on and guard.switches == 1
    # round 0: lane, bare, then bare in use once both blocks are timed; later rounds probe
    # the lane for one block each
    # (step 6 still ran the lane: step 5's time is known once step 6 has started)
    assert arms[:7] == [True] * 3 + [False] * 3 + [True]
    assert arms[11:22] == [False] * 3 + [True] * 3 + [False] * 5
    assert sum(arms[7:]) == 6  # two probe blocks of 3 in 26 steps
    assert guard.means == {True: 2.0, False: 1.0}


def test_an_arm_that_keeps_losing_is_probed_ever_less_often():
    """The steps between probes double each round the other arm loses again, up to
    EVERY x BACKOFF (a much slower arm costs ever less), and a switch still comes."""
    clock = FakeClock()
    guard = LaneGuard(clock, block=2, every=4)
    arms = run(guard, clock, 400, lambda i, arm: 2.0 if arm else 1.0)
    assert not guard.on and guard.switches == 1
    probes = [i for i in range(8, 400) if arms[i] and not arms[i - 1]]  # each probe block's start
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    # rounds of 2 + 2 + wait: wait 4 (after the switch), 8, 16, 32, then at most 4 x 8
    assert gaps[:4] == [8, 12, 20, 36] and set(gaps[4:]) == {36}, gaps
    assert sum(arms[100:]) == 2 * len([p for p in probes if p >= 100])
    run(guard, clock, 80, lambda i, arm: 0.5 if arm else 1.0)  # the lane is faster now
    assert guard.on and guard.switches == 2


def test_a_lane_that_becomes_faster_comes_back():
    clock = FakeClock()
    guard = LaneGuard(clock, block=2, every=4)
    run(guard, clock, 16, lambda i, arm: 2.0 if arm else 1.0)
    assert not guard.on
    run(guard, clock, 16, lambda i, arm: 0.5 if arm else 1.0)
    assert guard.on and guard.switches == 2


def test_times_known_late_decide_late_and_the_same():
    clock = FakeClock(lag=5)
    guard = LaneGuard(clock, block=2, every=4)
    arms = run(guard, clock, 30, lambda i, arm: 2.0 if arm else 1.0)
    assert not guard.on and guard.switches == 1
    assert arms[4:8] == [True] * 4  # the decision came 5 steps late: the lane went on meanwhile


def test_a_round_cut_by_a_prefill_decides_nothing():
    """The prefill between loses the time of the step before it: a block with no time left
    decides nothing, and the next round decides."""
    clock = FakeClock()
    guard = LaneGuard(clock, block=2, every=4)
    run(guard, clock, 2, lambda i, arm: 2.0)  # the lane's block: steps 0 (untimed), 1
    guard.restart()  # step 1's time is lost
    run(guard, clock, 2, lambda i, arm: 1.0 if not arm else 2.0)
    assert guard.on and guard.means == {}  # nothing compared: the lane's block has no time
    run(guard, clock, 12, lambda i, arm: 2.0 if arm else 1.0)
    assert not guard.on and guard.means == {True: 2.0, False: 1.0}


def test_the_host_clock_times_steps_from_one_start_to_the_next():
    clock = StepClock()
    clock.mark(0)
    time.sleep(0.02)
    clock.mark(1)
    got = clock.times()
    assert [s for s, _ in got] == [0] and got[0][1] >= 0.015
    clock.mark(2)
    assert [s for s, _ in clock.times()] == [1]
    assert clock.restart() == [2]  # step 2 never closed: its time is lost
    assert clock.times() == []


def test_a_decode_whose_lane_is_slow_runs_without_it_and_decodes_the_same(monkeypatch, tmp_path):
    """A tiny OPT compiled with an auto lane beside recompute on the CPU, its lane's every part
    made 30 ms slower: after the first round the guard runs the steps without it (their
    tokens go back to the plan's mix: more recomputed), probing it again once a round; the
    tokens are the reference's, the logits within 1e-5."""
    import kvc
    from kvc.models import build_model, preset
    from kvc.runtime.reference import ReferenceDecoder

    tiny = {"model": {"preset": "tiny-opt", "dtype": "float32"}, "hardware": "cpu",
            "workload": {"batch_size": 2, "prompt_len": 8, "gen_len": 26, "max_context": 64}}
    lane = ["schedule=pipelined", "schedule.cpu_attention=auto", "hardware.h2d_gbps=0.001",
            "hardware.cpu_attn_gbps=0.001", "hardware.cpu_attn_fixed_us=0",
            "hardware.cpu_attn_threads=2", "schedule.chunk_tokens=4"]
    artifact = kvc.compile(tiny, overrides=lane, output=tmp_path / "lane.kvc")
    guard_a_slow_lane(monkeypatch, 0.03)
    model = kvc.load(artifact, device="cpu")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    tokens, logits = model.generate(ids, 26, return_logits=True)
    spec = preset("tiny-opt")
    ref_tokens, ref_logits = ReferenceDecoder(build_model(spec, "cpu", torch.float32, seed=0), spec).generate(
        ids, 26, return_logits=True)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    guard = model._cache.guard
    assert not guard.on and guard.switches == 1 and guard.means[True] > guard.means[False] + 0.02
    # the last step (decode step 24: round 2's steps in use, after its probe) ran without it,
    # recomputing more than the plan at some unit
    cache, s = model._cache, model._cache.s - 1
    assert "beside recompute" in model.plan.notes["cpu_attention"]
    assert all(c == 0 for _, c in cache.cpu_rows.values())
    assert any(cache.bounds[u][-1] > model.plan.recompute_tokens(u, s) for u in cache.cpu_rows)
