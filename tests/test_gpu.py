"""GPU-only checks (skipped without CUDA; run them on the device machine):
the decode step never synchronises the host, allocates no new device memory segments after
the first steps, and matches the reference decoder in fp16; host pools are page-locked to
their exact size and unregistered when freed."""
import gc
from dataclasses import replace

import pytest
import torch

from kvc.compiler.lowering import lower
from kvc.models import build_model, preset
from kvc.runtime.reference import ReferenceDecoder
from kvc.ir.plan import forced_plan, weights_for_fraction
from kvc.runtime import pinned
from kvc.api import assemble

pytestmark = pytest.mark.gpu


def _compiled(name, mode, fraction, prompt=64, gen=16, micro_batches=1, streamed=0.0, graphs=False):
    spec = preset(name)
    model = build_model(spec, "cuda", torch.float16, seed=0)
    plan = forced_plan(mode, spec.num_layers, prompt, gen, 64, fraction,
                       act_chunks=4 if mode == "pipelined" else 1, micro_batches=micro_batches)
    plan = replace(plan, weights_streamed=weights_for_fraction(spec.num_layers, streamed))
    if streamed:  # the streamer takes the parameters over: the reference gets its own copy
        model, ref = build_model(spec, "cuda", torch.float16, seed=0), model
    else:
        ref = model
    plan = replace(plan, cuda_graphs=graphs)
    return spec, ref, assemble(lower(model, plan), plan, spec, torch.float16, torch.device("cuda"))


# (mode, micro-batches, fraction of weights streamed): issue 6's block schedule included
SCHEDULES = [("full_offload", 1, 0.0), ("kvpr", 1, 0.0), ("pipelined", 1, 0.0),
             ("pipelined", 2, 1.0), ("full_offload", 2, 0.5)]


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("mode,micro_batches,streamed", SCHEDULES + [("gpu_resident", 1, 0.0)])
def test_decode_step_never_syncs_the_host(mode, micro_batches, streamed, graphs):
    spec, _, cm = _compiled("opt-125m", mode, 0.5, micro_batches=micro_batches, streamed=streamed,
                            graphs=graphs)
    ids = torch.randint(0, spec.vocab_size, (4, 64), device="cuda")
    cm.generate(ids, 4)  # warm-up: pools, kernels, CUDA graph capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any implicit device->host sync raises
    try:
        cm.generate(ids, 8)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("graphs", [False, True])
def test_no_new_device_segments_after_warm_up(graphs):
    spec, _, cm = _compiled("opt-125m", "pipelined", 0.5, graphs=graphs)
    ids = torch.randint(0, spec.vocab_size, (4, 64), device="cuda")
    cm.generate(ids, 8)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["segment.all.allocated"]
    cm.generate(ids, 8)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["segment.all.allocated"] == before


@pytest.mark.parametrize("name", ["opt-125m", "tiny-llama-gqa"])
@pytest.mark.parametrize("mode,fraction,micro_batches,streamed",
                         [("full_offload", 0.0, 1, 0.0), ("kvpr", 0.5, 1, 0.0), ("pipelined", 0.5, 1, 0.0),
                          ("pipelined", 1.0, 1, 0.0), ("pipelined", 0.5, 2, 1.0), ("kvpr", 0.5, 2, 0.5),
                          ("gpu_resident", 0.0, 1, 0.0)])
@pytest.mark.parametrize("graphs", [False, True])
def test_fp16_matches_reference(name, mode, fraction, micro_batches, streamed, graphs):
    spec, model, cm = _compiled(name, mode, fraction, micro_batches=micro_batches, streamed=streamed,
                                graphs=graphs)
    ids = torch.randint(0, spec.vocab_size, (4, 64), device="cuda")
    # micro-batches run GEMMs of b/m rows, which fp16 rounds differently than b rows: the
    # reference decodes the same micro-batches
    ref_t, ref_l = ReferenceDecoder(model, spec).generate_in_micro_batches(ids, 16, micro_batches, True)
    t, logits = cm.generate(ids, 16, return_logits=True)
    assert (logits - ref_l.float()).abs().max().item() <= 2e-2
    assert torch.equal(t, ref_t)


def test_pinned_pool_is_registered_exactly_and_unregistered_when_freed(monkeypatch):
    released = []
    real = pinned._unregister

    def spy(ptr):
        released.append((ptr, real(ptr)))
        return released[-1][1]

    monkeypatch.setattr(pinned, "_unregister", spy)
    n = 3 * (1 << 20) + 2048  # elements: 6 MB + 4 KB, not a power of two
    assert not torch.empty(n, dtype=torch.float16).is_pinned()  # a plain tensor is not
    pool = pinned.pinned_empty((n,), torch.float16, torch.device("cuda"))
    assert pool.is_pinned() and pool.untyped_storage().nbytes() == 2 * n
    pool.copy_(torch.arange(n, dtype=torch.float32).remainder(2048).half())
    side = torch.cuda.Stream()
    dev = torch.empty(n, dtype=torch.float16, device="cuda")
    with torch.cuda.stream(side):
        dev.copy_(pool, non_blocking=True)
    side.synchronize()
    assert torch.equal(dev.cpu(), pool)
    ptr, view = pool.data_ptr(), pool[4096:]
    del pool
    gc.collect()
    assert released == [] and view.is_pinned()  # the view still uses the memory
    del view
    gc.collect()
    assert released == [(ptr, 0)]
    # nothing stale is left: a fresh pool (often at the same address) registers again
    again = pinned.pinned_empty((n,), torch.float16, torch.device("cuda"))
    assert again.is_pinned()


def test_compiled_pools_are_pinned_and_freed_on_close():
    spec = preset("opt-125m")
    model = build_model(spec, "cuda", torch.float16, seed=0)
    plan = replace(forced_plan("pipelined", spec.num_layers, 64, 8, 64, 1.0),
                   weights_streamed=weights_for_fraction(spec.num_layers, 0.5))
    ids = torch.randint(0, spec.vocab_size, (4, 64), device="cuda")
    ref = ReferenceDecoder(build_model(spec, "cuda", torch.float16, seed=0), spec).generate(ids, 8)
    cm = assemble(lower(model, plan), plan, spec, torch.float16, torch.device("cuda"))
    assert torch.equal(cm.generate(ids, 8), ref)
    c = cm._cache
    assert c.act_pool.is_pinned() and c.k_pool.is_pinned() and c.v_pool.is_pinned()
    assert c.k_pool.shape[1] == c.max_tokens - 64  # everything recomputed: rows [64, 72) only
    assert cm._weights.flat.is_pinned()
    flat = cm._weights.flat
    assert all(p.untyped_storage().data_ptr() == flat.data_ptr() for p in cm._weights.pools.values())
    cm.close()
    del c
    gc.collect()


@pytest.mark.parametrize("name,mode,micro_batches,streamed",
                         [("opt-125m", "gpu_resident", 1, 0.0), ("tiny-llama-gqa", "pipelined", 1, 0.0),
                          ("opt-125m", "pipelined", 2, 1.0)])
def test_cuda_graphs_capture_once_and_replay_the_eager_numbers(name, mode, micro_batches, streamed):
    """Every segment is captured at the second decode step, never again for the same batch,
    and the replayed steps give the tokens and logits of the same graph run eagerly."""
    fraction = 0.0 if mode == "gpu_resident" else 0.5
    spec, _, cm = _compiled(name, mode, fraction, micro_batches=micro_batches, streamed=streamed, graphs=True)
    ids = torch.randint(0, spec.vocab_size, (4, 64), device="cuda")
    graphs = cm.graphs
    t, logits = cm.generate(ids, 12, return_logits=True)
    assert graphs.captured == len(graphs.segments) > 0
    t2, logits2 = cm.generate(ids, 12, return_logits=True)
    assert graphs.captured == len(graphs.segments)
    # reading a weight slot streamed in with another layer's weights (or a stale buffer)
    # would change the numbers, not just round them
    cm.close()
    assert graphs.captured == 0
    # built last: a second weight streamer on the same model takes its parameters over
    eager = assemble(cm.lowered, cm.plan, spec, torch.float16, torch.device("cuda"), cuda_graphs=False)
    ref_t, ref_l = eager.generate(ids, 12, return_logits=True)
    assert torch.equal(t, ref_t) and torch.equal(t2, ref_t)
    assert (logits - ref_l).abs().max().item() <= 2e-2
    assert torch.equal(logits, logits2)


def _padded(vocab: int, lengths=(64, 17, 40, 1)):
    """A left-padded batch (padding id 0) of prompts of these lengths, and its mask."""
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = torch.randint(1, vocab, (n,), device="cuda")
        mask[r, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("name", ["opt-125m", "tiny-llama-gqa"])
@pytest.mark.parametrize("mode,fraction,micro_batches,streamed",
                         [("pipelined", 0.5, 1, 0.0), ("kvpr", 0.5, 2, 0.5), ("full_offload", 0.0, 1, 0.0),
                          ("gpu_resident", 0.0, 1, 0.0)])
@pytest.mark.parametrize("graphs", [False, True])
def test_fp16_left_padded_batch_matches_reference(name, mode, fraction, micro_batches, streamed, graphs):
    """Mixed-length prompts in one batch (issue 15) on the GPU: the reference decodes the same
    padded micro-batches; CUDA graphs capture the padded step (per-row positions) and replay it."""
    spec, model, cm = _compiled(name, mode, fraction, micro_batches=micro_batches, streamed=streamed,
                                graphs=graphs)
    ids, mask = _padded(spec.vocab_size)
    ref = ReferenceDecoder(model, spec)
    parts = [ref.generate(x, 16, True, attention_mask=m)
             for x, m in zip(ids.split(4 // micro_batches), mask.split(4 // micro_batches))]
    ref_t, ref_l = torch.cat([t for t, _ in parts]), torch.cat([lg for _, lg in parts])
    t, logits = cm.generate(ids, 16, return_logits=True, attention_mask=mask)
    assert (logits - ref_l.float()).abs().max().item() <= 2e-2
    assert torch.equal(t, ref_t)
    # the padded step never syncs the host either (the mask on the CPU, as a tokenizer gives
    # it), and an unpadded call after it is unchanged
    mask = mask.cpu()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cm.generate(ids, 8, attention_mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    full = ids[:1].expand(4, -1).contiguous()
    assert torch.equal(cm.generate(full, 8), cm.generate(full, 8, attention_mask=torch.ones_like(full)))


def assert_agrees(tokens, logits, ref_tokens, ref_logits, prompt: int, tol: float, where: str):
    """fp16 agreement with the reference, free-running: per row, the logits of every step up
    to and including the first whose token differs (the inputs were the same until then) are
    within `tol`, and a differing token is a near-tie of the reference's (its top two within
    2 x tol: either run may round it its way). After a divergence the rows decode different
    sequences, so their later logits are not compared."""
    diff = (logits - ref_logits.float()).abs().amax(-1)  # [b, n]
    differ = tokens[:, prompt:] != ref_tokens[:, prompt:]
    n = diff.shape[1]
    for row in range(diff.shape[0]):
        bad = differ[row].nonzero()
        d = int(bad[0]) if len(bad) else n
        worst = diff[row, :min(d + 1, n)].max().item()
        assert worst <= tol, f"{where}: row {row}: logits off by {worst:.3g} before any divergence (step {d})"
        if d < n:
            top = ref_logits[row, d].float().topk(2).values
            margin = (top[0] - top[1]).item()
            assert margin <= 2 * tol, (f"{where}: row {row} chose another token at step {d} where the "
                                       f"reference's margin was {margin:.3g}, not a near-tie")


# Issue 17. Free-running fp16 comparisons of the lane failed in some H200 runs (2026-11-28:
# 0.09 to 0.9 over 16 steps, random prompts): assert_agrees tells a wrong partial (logits off
# before any divergence) from a near-tie two correct fp16 runs round differently. Under it all
# 24 cases passed on the H200 (2026-11-28, session 8): the failures were near-ties. Since
# session 9 the lane runs inside piecewise CUDA graphs too (its nodes are eager ones).
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", ["opt-125m", "tiny-llama-gqa"])
@pytest.mark.parametrize("mode,fraction,cpu_fraction", [("pipelined", 0.3, 0.3), ("full_offload", 0.0, 0.5),
                                                        ("kvpr", 0.25, 0.5)])
def test_fp16_cpu_lane_matches_reference(name, mode, fraction, cpu_fraction, seed, graphs):
    """The oldest rows attended to by the CPU worker, merged on the GPU, in fp16: the
    reference's decoding within the fp16 tolerance (assert_agrees), twice (the second call
    reuses the pools, buffers and the worker)."""
    spec = preset(name)
    model = build_model(spec, "cuda", torch.float16, seed=0)
    plan = replace(forced_plan(mode, spec.num_layers, 64, 16, 64, fraction,
                               act_chunks=4 if mode == "pipelined" else 1, cpu_fraction=cpu_fraction),
                   cuda_graphs=graphs)
    cm = assemble(lower(model, plan), plan, spec, torch.float16, torch.device("cuda"))
    assert (cm.graphs is not None) == graphs
    torch.manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (4, 64), device="cuda")
    ref_t, ref_l = ReferenceDecoder(model, spec).generate(ids, 16, True)
    for call in range(2):
        t, logits = cm.generate(ids, 16, return_logits=True)
        assert_agrees(t, logits, ref_t, ref_l, 64, 2e-2, f"{name} {mode} seed {seed} call {call}")
    assert sum(c for _, c in cm._cache.cpu_rows.values()) > 0
    cm.close()


@pytest.mark.parametrize("mode", ["full_offload", "pipelined"])
def test_fp16_auto_lane_guard_drops_a_slow_lane_on_the_gpu(monkeypatch, mode):
    """kvc.runtime.lane_guard with CUDA events: an auto plan whose lane's every part is made
    20 ms slower runs its steps without the lane after the first round (pipelined: its tokens
    recomputed, new shapes for the recompute's CUDA graphs), and decodes the reference's
    tokens within the fp16 tolerance."""
    from kvc_fixtures import guard_a_slow_lane

    from kvc.api import make_plan, resolve
    from kvc.config import load_config

    guard_a_slow_lane(monkeypatch, 0.02)
    cfg = {"model": {"preset": "tiny-opt", "dtype": "float16"}, "hardware": "cpu",
           "workload": {"batch_size": 4, "prompt_len": 64, "gen_len": 26, "max_context": 96}}
    lane = [f"schedule={mode}", "schedule.cpu_attention=auto", "hardware.h2d_gbps=0.001",
            "hardware.cpu_attn_gbps=0.001", "hardware.cpu_attn_fixed_us=0", "schedule.chunk_tokens=4"]
    plan = make_plan(resolve(load_config(cfg, lane)))
    assert plan.cpu and plan.cpu_gbps == 0.001
    assert mode == "full_offload" or "beside recompute" in plan.notes["cpu_attention"]
    spec = preset("tiny-opt")
    model = build_model(spec, "cuda", torch.float16, seed=0)
    cm = assemble(lower(model, plan), plan, spec, torch.float16, torch.device("cuda"))
    ids = torch.randint(0, spec.vocab_size, (4, 64), device="cuda")
    ref_t, ref_l = ReferenceDecoder(model, spec).generate(ids, 26, True)
    t, logits = cm.generate(ids, 26, return_logits=True)
    assert_agrees(t, logits, ref_t, ref_l, 64, 2e-2, "auto lane guarded")
    guard = cm._cache.guard
    assert not guard.on and guard.switches == 1 and guard.means[True] > guard.means[False] + 0.01
    assert all(c == 0 for _, c in cm._cache.cpu_rows.values())
    cm.close()


def test_the_profiler_measures_the_cpu_lane():
    """kvc.profiler.cpu_lane on this GPU's host: the kernel's rate beside a copy loop and the
    hand-off, positive and plausible (the H200's host: 38-55 GB/s, ~260 us, 2026-11-29)."""
    from kvc.profiler.cpu_lane import cpu_attention

    got = cpu_attention(torch.device("cuda"), torch.float16, reps=3, contexts=(256, 1024))
    assert 0.5 < got["cpu_attn_gbps"] < 1000 and 0 < got["cpu_attn_fixed_us"] < 100_000
    assert got["cpu_attn_threads"] >= 1


def test_a_stream_waits_for_a_flag_and_the_host_does_not():
    """kvc.runtime.flagwait: work queued behind the poll runs only once the host has written
    the flag, a copy on another stream goes on beside it, and the host thread that queued it
    went on at once."""
    import time

    from kvc.runtime import flagwait

    assert flagwait.available()
    flags, stream, other = flagwait.FlagWait(2), torch.cuda.Stream(), torch.cuda.Stream()
    src = torch.arange(1 << 20, dtype=torch.float32).pin_memory()
    dst, beside = torch.zeros(1 << 20, device="cuda"), torch.zeros(1 << 20, device="cuda")
    t0 = time.perf_counter()
    flags.wait(1, 1, stream)
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
    assert time.perf_counter() - t0 < 0.5
    with torch.cuda.stream(other):
        beside.copy_(src, non_blocking=True)
    other.synchronize()  # not held back by the poll
    time.sleep(0.2)
    assert not stream.query() and torch.equal(beside.cpu(), src)
    flags.post(0, 5)  # another slot: still waiting
    time.sleep(0.1)
    assert not stream.query()
    flags.post(1, 1)
    stream.synchronize()
    assert torch.equal(dst.cpu(), src)


def _lane_run(monkeypatch, wrap, name="tiny-llama-gqa"):
    """Tokens and logits of a pipelined fp16 plan with the lane, partial_attention wrapped."""
    import kvc.runtime.cpu_attention as ca

    spec = preset(name)
    model = build_model(spec, "cuda", torch.float16, seed=0)
    plan = forced_plan("pipelined", spec.num_layers, 64, 16, 64, 0.3, act_chunks=4, cpu_fraction=0.4)
    cm = assemble(lower(model, plan), plan, spec, torch.float16, torch.device("cuda"))
    ids = torch.randint(0, spec.vocab_size, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with monkeypatch.context() as m:
        m.setattr(ca, "partial_attention", wrap(ca.partial_attention))
        try:
            return cm.generate(ids, 12, return_logits=True)
        finally:
            cm.close()


def test_a_slow_cpu_part_changes_no_logit(monkeypatch):
    """The host does not wait for the lane's partials: with a CPU part 3 ms slower per unit
    (the host ahead of the GPU, every copy up behind its poll) the logits are bit for bit
    those of the lane at full speed."""
    import time

    def slow(fn):
        def run(*a, **k):
            time.sleep(0.003)
            return fn(*a, **k)
        return run
    t_fast, l_fast = _lane_run(monkeypatch, lambda fn: fn)
    t_slow, l_slow = _lane_run(monkeypatch, slow)
    assert torch.equal(t_fast, t_slow) and torch.equal(l_fast, l_slow)


def test_a_failing_cpu_part_raises_and_nothing_hangs(monkeypatch):
    """A CPU part that fails writes its flag all the same (the stream does not hang) and the
    generate call raises the failure."""
    calls = []

    def failing(fn):
        def run(*a, **k):
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("injected CPU lane failure")
            return fn(*a, **k)
        return run
    with pytest.raises(RuntimeError, match="injected CPU lane failure"):
        _lane_run(monkeypatch, failing)


def test_a_stream_signals_the_host_through_a_flag():
    """flagwait.signal: the flag changes only once the stream's earlier work is done, and
    await_ (which calls no CUDA) sees it."""
    import time

    from kvc.runtime import flagwait

    flags, stream = flagwait.FlagWait(2), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock
    flags.signal(1, 3, stream)
    assert flags.value(1) == 0
    t0 = time.perf_counter()
    flags.await_(1, 3)
    assert flags.value(1) == 3 and stream.query() and time.perf_counter() - t0 < 10


def test_a_poll_gives_up_and_says_what_it_waited_for(monkeypatch):
    """A flag never written: the poll lets its stream go on after TIMEOUT_S and records the
    slot, the value it wanted and the last it saw; a host wait raises one line."""
    from kvc.errors import KvcError
    from kvc.runtime import flagwait

    monkeypatch.setattr(flagwait, "TIMEOUT_S", 0.3)
    flags, stream = flagwait.FlagWait(3), torch.cuda.Stream()
    flags.post(2, 4)
    flags.wait(2, 7, stream)
    stream.synchronize()  # returns: the poll gave up
    assert flags.timed_out() == "a GPU stream waited 0 s for flag 2 to reach 7 (it was 4)"
    assert flags.timed_out(clear=True) and flags.timed_out() is None  # said once
    with pytest.raises(KvcError, match="for the query's copy .*flag 1 at 0, expected 1"):
        flags.await_(1, 1, "the query's copy")


def test_a_module_loaded_while_a_poll_waits_does_not_deadlock(monkeypatch):
    """Under lazy module loading a kernel's first launch loads its module holding the
    context's lock until the GPU's queued work, a pending poll included, has drained (the
    stall of session 11). A poster that calls no CUDA releases the poll, and the load ends;
    the poll never needed its timeout."""
    import threading
    import time

    from kvc.runtime import flagwait

    monkeypatch.setattr(flagwait, "TIMEOUT_S", 20.0)
    flags, stream = flagwait.FlagWait(1), torch.cuda.current_stream()
    flags.wait(0, 1, stream)
    poster = threading.Thread(target=lambda: (time.sleep(0.5), flags.post(0, 1)))
    poster.start()
    t0 = time.perf_counter()
    name = f"kvc_fresh_{time.time_ns() % 10**9}"
    src = f'extern "C" __global__ void {name}(int* x) {{ *x += 1; }}'
    fresh = torch.cuda._compile_kernel(src, name)  # a module load
    x = torch.zeros(1, dtype=torch.int32, device="cuda")
    fresh(grid=(1, 1, 1), block=(1, 1, 1), args=[x])
    torch.special.bessel_j1(torch.ones(4, device="cuda"))  # a kernel this process never ran
    stream.synchronize()
    poster.join()
    assert x.item() == 1 and flags.timed_out() is None and time.perf_counter() - t0 < 15


def test_a_stalled_lane_raises_instead_of_hanging(monkeypatch):
    """A CPU part that outlasts the poll's timeout: the step goes on with the partial
    unfinished, and the generate call raises one line naming the lane (never a frozen
    process)."""
    import time

    from kvc.errors import KvcError
    from kvc.runtime import flagwait

    monkeypatch.setattr(flagwait, "TIMEOUT_S", 0.3)
    calls = []

    def stalling(fn):
        def run(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                time.sleep(1.5)
            return fn(*a, **k)
        return run
    with pytest.raises(KvcError, match="CPU attention lane stalled"):
        _lane_run(monkeypatch, stalling)
