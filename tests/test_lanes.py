"""One walk of the step's lanes (kvc.planner.lanes), three backends: the LP the scheduler
solves is generated from it, `simulate` evaluates it on arrays, `intervals` draws it."""
import numpy as np
import pytest

from kvc.hardware import HardwareConfig
from kvc.models import PRESETS
from kvc.planner import cost, lanes, lp

HW = HardwareConfig(name="t", h2d_gbps=25, d2h_gbps=25, bidir_gbps=20, gemm_tflops=300,
                    gemm_half_rows=64, attn_gbps=2000, gpu_mem_gb=80, link_latency_us=10,
                    launch_us=5, attn_fixed_us=8)


def _arrays(st: lanes.Step):
    return [np.asarray(v, dtype=float) for v in (st.A, st.K, st.R, st.C, st.D, st.W)]


def _instance(rng):
    spec = PRESETS[str(rng.choice(["opt-6.7b", "llama-2-7b"]))]
    m = int(rng.integers(1, 4))
    c = cost.layer_costs(spec, HW, int(rng.choice([4, 16, 32])), "float16")
    L = int(rng.integers(2, 6))
    look, chunks = [(0, 1), (1, 1), (1, 2), (1, 4)][int(rng.integers(4))]
    kw = dict(look=look, chunks=chunks, m=m, deadline=1e18, with_step=True, with_values=True,
              resident=tuple(bool(r) for r in rng.random(L) < 0.3))
    pick = rng.random(4)
    if pick[0] < 0.3:
        kw["mem_budget"] = (float(rng.uniform(0, 2)), 1.0)
    if pick[1] < 0.3:
        kw["weight_budget"] = (c.weight_copy, 1.0, float(rng.uniform(2.0, L + 1.0)))
    elif pick[1] < 0.6:
        kw["wcopy"] = [c.weight_copy * float(rng.random() < 0.5) for _ in range(L)]
    if pick[2] < 0.2:
        kw["fixed_x"] = 0.0
    s = int(rng.choice([128, 1024, 4000]))
    if pick[3] < 0.4:  # each layer at its own context (sliding windows)
        s = [int(v) for v in rng.choice([7, 128, s], L)]
    return c, L, s, kw


@pytest.mark.parametrize("seed", range(12))
def test_the_lps_step_is_the_walk_at_its_solution(seed):
    """The LP is the walk with each max a variable: its optimal T is the walk's step on the
    LP's own durations at the LP's solution, for numpy arrays and for floats."""
    rng = np.random.default_rng(seed)
    for _ in range(3):
        c, L, s, kw = _instance(rng)
        x, z, w, T, st = lp.solve(c, L, s, **kw)
        A, K, R, C, D, W = _arrays(st)
        step = cost.simulate(*(v[:, None] for v in (A, K, R, C, D)), st.head, st.lookahead,
                             st.act_chunks, W=W[:, None], weight_lag=st.weight_lag,
                             back=st.back, front=st.front, offloaded=st.offloaded,
                             streams=st.streams)[0][0]
        assert step == pytest.approx(T, rel=1e-6, abs=1e-9), kw
        ends = cost.intervals(A, K, R, C, D, st.head, st.lookahead, st.act_chunks, W=W,
                              weight_lag=st.weight_lag, back=st.back, front=st.front,
                              offloaded=st.offloaded, streams=st.streams)
        assert max(it["end"] for it in ends) == pytest.approx(T, rel=1e-6, abs=1e-9)


def test_the_lp_names_a_variable_per_max_not_by_hand():
    """No hand-written inequality is left: every time variable of the LP is one of the walk's
    maxes (the per-layer x, z, w and the weight slot are the LP's own)."""
    import pulp

    c = cost.layer_costs(PRESETS["opt-6.7b"], HW, 8, "float16")
    prob = pulp.LpProblem("p", pulp.LpMinimize)
    ops = lanes.LpOps(prob)
    x = [prob.add_variable(f"x{i}", 0, 1) for i in range(3)]
    st = lp.durations(c, [1024] * 3, x, [0.0] * 3, [0.0] * 3, (False,) * 3, look=1, chunks=2,
                      m=1, streams=[False] * 3)
    lanes.walk(ops, st)
    names = {v.name for v in prob.variables()}
    assert names - {f"x{i}" for i in range(3)} == {f"t{k}" for k in range(ops.count)}


@pytest.mark.parametrize("lookahead,chunks", [(0, 1), (1, 1), (1, 3)])
def test_simulate_ends_where_the_intervals_end(lookahead, chunks):
    """Random durations, resident units, streamed weights, front and back: the step of
    `simulate` is the end of the picture, and no lane runs two things at once."""
    rng = np.random.default_rng(lookahead * 10 + chunks)
    for _ in range(30):
        U = int(rng.integers(1, 8))
        off = rng.random(U) > 0.3
        A, K, R, D = (rng.uniform(0, 2, U) * off for _ in range(4))
        front, back = rng.uniform(0, 0.3, 2)
        C = rng.uniform(0, 2, U) + front + back
        W = rng.uniform(0, 2, U) * (rng.random(U) < 0.3)
        head = float(rng.uniform(0, 1))
        kw = dict(W=W, weight_lag=int(rng.integers(2, 4)), back=float(back), front=float(front),
                  offloaded=off)
        step = cost.simulate(*(v[:, None] for v in (A, K, R, C, D)), head, lookahead, chunks,
                             **{**kw, "W": W[:, None]})[0][0]
        items = cost.intervals(A, K, R, C, D, head, lookahead, chunks, **kw)
        assert max(it["end"] for it in items) == pytest.approx(step)
        for lane in ("copy-in", "compute", "copy-out"):
            spans = sorted((it["start"], it["end"]) for it in items if it["lane"] == lane)
            assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:])), lane


def test_a_resident_unit_waits_for_no_copies():
    """Only a unit with copies (offloaded, or streaming its weights) waits for them; a
    resident unit's compute follows the previous unit's and nothing on the copy stream."""
    A, K, R, C, D = (np.array([[0.0], [5.0]]), np.array([[0.0], [5.0]]), np.zeros((2, 1)),
                     np.array([[1.0], [1.0]]), np.zeros((2, 1)))
    # unit 1 (offloaded) waits for its copies; unit 0 (resident) runs at once
    step = cost.simulate(A, K, R, C, D, 0.0, 1, 1, offloaded=[False, True])[0][0]
    assert step == pytest.approx(11.0)
    # swap: a resident unit behind an offloaded one waits only for its compute
    step = cost.simulate(A[::-1], K[::-1], R, C, D, 0.0, 1, 1, offloaded=[True, False])[0][0]
    assert step == pytest.approx(12.0)
    # a resident unit that streams its weights waits for them
    W = np.array([[0.0], [3.0]])
    step = cost.simulate(0 * A, 0 * K, R, C, D, 0.0, 1, 1, W=W, offloaded=[False, False])[0][0]
    assert step == pytest.approx(4.0)
