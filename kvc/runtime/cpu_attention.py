"""The CPU attention lane (issue 17): decode attention over the oldest cached rows of an
offloaded layer, computed by the CPU beside the copies.

At a decode step an offloaded unit attends to its n cached tokens [lo, s). With the lane it
attends to the oldest c of them on the CPU while the GPU attends to the rest (recomputed,
copied, and the step's own token). Each side returns its softmax's log-sum-exp with its
output, and kvc.models.attend.merge combines them exactly (the split-softmax merge of
flash-decoding):

    out = (out_g * exp(lse_g - m) + out_c * exp(lse_c - m)) / (exp(lse_g - m) + exp(lse_c - m))

The CPU does not read the token-major pinned pool [s, b, kv, hd] in place: one head's rows
sit 64 KB apart there (llama-3-8b b32), every row a new page, and the kernel is bound by
latency, 19 GB/s at llama-3-8b b32 s2048 with the link copying beside it on the H200's host
(tools/cpu_kernel_probe.py, 2026-11-29). The lane keeps its own head-major copy of each
unit's rows [b, kv, rows, hd] (contiguous per head; 50 GB/s there, the same op), filled from
the pool by the worker: at the prefill, as soon as each unit's write-back has landed (hidden
behind the prefill's later layers), and then one row at a time as the CPU's share grows.
A row is written once per call (the cache only grows), so the copy never goes stale; the
next prefill starts it over. Untouched rows cost no memory (pageable, allocated lazily).

The query crosses to the host once per layer (b x heads x head_dim values) and the partial
comes back (b x heads x (head_dim + 1)). On a CUDA device the CPU work runs in one worker
thread (torch's CPU kernels release the GIL and use the intra-op thread pool), and the host
thread does not wait for it (unless it is AHEAD units ahead): `end` queues, on the compute
stream, a poll of a flag the worker writes once the partial is in pinned memory
(kvc.runtime.flagwait: a one-thread kernel, device work like any other), then the partial's
copy up. So the layer's rest and the next layers' work are already issued when the CPU's
part lands. (Before the poll `end` blocked the host: each unit's CPU part was followed,
serially, by the host issuing the layer's rest and the next layer's front, 0.6-0.8 ms a unit
at llama-3-8b b32 on the H200.) The worker learns that the query and the pools' rows have landed
from flags the GPU's streams write, never from CUDA events: a worker blocked in any CUDA call
while a module loads can deadlock with the poll (flagwait's docstring). Without NVRTC the
host waits and the worker waits on events. On a CPU device the lane runs inline.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from kvc.errors import KvcError
from kvc.hardware import default_cpu_attn_threads
from kvc.runtime import flagwait


def partial_attention(q: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, scale: float,
                      softcap: float = 0.0, real: torch.Tensor | None = None):
    """One decode query per row against c cached rows. q [b, H, hd]; kk, vv [b, n_kv, c, hd]
    (head-major: each head's rows contiguous is what the CPU reads fast; any strides work);
    `real` [b, c] bool (False: a padding row, never attended). Returns (out [b, H, hd],
    lse [b, H]), float32; a row with no real key gets lse = -inf and out = 0 (it weighs
    nothing in the merge).

    The query heads sharing a KV head are stacked as query rows ([b, n_kv, g, hd]: no K,V
    repeated) and torch's CPU flash attention computes output and log-sum-exp in one pass;
    a soft-capped model (Gemma 2) goes through two GEMMs and the cap, which flash attention
    does not apply."""
    b, h, d = q.shape
    n_kv = kk.shape[1]
    qg = q.reshape(b, n_kv, h // n_kv, d).to(kk.dtype)
    if not softcap:
        bias = None
        if real is not None:  # additive, in the query's dtype (the op's rule)
            bias = torch.zeros(real.shape, dtype=qg.dtype).masked_fill(~real, -math.inf)[:, None, None, :]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qg, kk, vv, 0.0, False, attn_mask=bias, scale=scale)
        out, lse = out.float(), lse.float()
        if real is not None:  # a row with no key: the op returns 0 and lse 0, which would weigh
            empty = ~real.any(1)
            lse = lse.masked_fill(empty[:, None, None], -math.inf)
        return out.reshape(b, h, d), lse.reshape(b, h)
    scores = torch.matmul(qg, kk.transpose(-1, -2)).float() * scale  # [b, n_kv, g, c]
    scores = torch.tanh(scores / softcap) * softcap
    if real is not None:
        scores.masked_fill_(~real[:, None, None, :], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [b, n_kv, g]
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.matmul(probs.to(vv.dtype), vv).float()  # [b, n_kv, g, hd]
    return out.reshape(b, h, d), lse.reshape(b, h)


# The most units whose partials the host has queued (`end`) before the CPU has computed
# them. The GPU's work after a unit's merge (the layer's rest, the next layer's front) is
# issued AHEAD units before it can run, so it never waits for the host; beyond that the host
# sleeps (a future's wait) instead of running ahead into CUDA's launch queue, where it would
# spin on a core the kernel's threads use.
AHEAD = 2

# the lane's flags per unit (kvc.runtime.flagwait): the partial is in pinned memory (the worker
# posts, the compute stream's poll waits), the query has reached the host (the compute stream
# signals, the worker waits), the step's write-back and the prefill's have landed in the pools
# (their stream signals, the worker waits). One writer per flag, so values only grow.
_KINDS = POSTED, QUERY, LANDED, PREFILLED = range(4)


def _fine_sleeps() -> None:
    """Let this thread's short sleeps end on time (Linux: a timer slack of 1 us, not 50): the
    worker sleeps on the GPU's flags between checks (flagwait.await_), and each wake-up on the
    lane's critical path would otherwise come up to 50 us late."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, ns
    except (OSError, AttributeError):  # not Linux: the default slack
        pass


class CpuLane:
    """Per unit and step: `begin` hands the query to the CPU, `end` returns the partial on the
    device. Buffers are per unit: a unit's next query is copied down on the compute stream
    after its last partial was merged there, and the worker waits for that copy before it
    writes the unit's partial again, so no buffer is overwritten in use.

    Per unit, the head-major copy of its pool's rows (`rows`: K and V [b, kv, max_tokens,
    hd], token r at row r) and how many tokens it holds (`filled`): only the worker touches
    them (or the caller on a CPU device), in the order the jobs were handed over."""

    def __init__(self, device: torch.device, num_units: int, threads: int = 0):
        self.device = torch.device(device)
        self.threads = threads or default_cpu_attn_threads()
        self.cuda = self.device.type == "cuda"
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="kvc-cpu-attention") if self.cuda else None
        self.pending: dict[int, Future | tuple] = {}  # begun, not yet ended
        self.inflight: list[Future] = []  # ended (the partial's copy up is queued), not reaped
        self.host: dict[int, tuple[torch.Tensor, ...]] = {}
        # per unit, how many queries were handed over (the flag values of this step's
        # signals) and how many prefills' write-backs the worker copied rows after
        self.seq: dict[int, int] = {}
        self.prefills: dict[int, int] = {}
        self.num_units = num_units
        index = self.device.index if self.device.index is not None else (
            torch.cuda.current_device() if self.cuda else 0)
        self.flags = (flagwait.FlagWait(len(_KINDS) * num_units, index)
                      if self.cuda and flagwait.available(index) else None)
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.filled: dict[int, int] = {}
        self.chores: list[Future] = []  # the copies into `rows` still in the worker
        self._threads_set = False

    def _run(self, job, *events) -> Future | object:
        """Run `job` after `events` (CUDA events recorded by the caller): in the worker on a
        GPU (which waits for them there, not the host), at once on a CPU device."""
        if not self.cuda:
            return job()

        def after():
            if not self._threads_set:
                torch.set_num_threads(self.threads)
                _fine_sleeps()
                self._threads_set = True
            for ev in events:
                ev.synchronize()  # the GIL is released while it waits
            with torch.inference_mode():  # as the caller's (inference mode is per thread)
                return job()
        return self.worker.submit(after)

    def _landed(self, stream) -> tuple:
        """An event after the work issued so far on `stream` (None: nothing to wait for)."""
        if not self.cuda or stream is None:
            return ()
        ev = torch.cuda.Event(blocking=True)
        ev.record(stream)
        return (ev,)

    def _fill(self, unit: int, k_pool: torch.Tensor, v_pool: torch.Tensor, end: int) -> None:
        """Copy the pool's tokens [filled, end) into the unit's head-major rows (in the
        worker, once they have landed in the pool)."""
        have = self.filled.get(unit, 0)
        if end <= have:
            return
        if unit not in self.rows:
            shape = (k_pool.shape[1], k_pool.shape[2], k_pool.shape[0], k_pool.shape[3])
            self.rows[unit] = (torch.empty(shape, dtype=k_pool.dtype), torch.empty(shape, dtype=v_pool.dtype))
        k_hm, v_hm = self.rows[unit]
        k_hm[:, :, have:end].copy_(k_pool[have:end].permute(1, 2, 0, 3))
        v_hm[:, :, have:end].copy_(v_pool[have:end].permute(1, 2, 0, 3))
        self.filled[unit] = end

    def restart(self) -> None:
        """A new call's prefill rewrites the pools: every unit's copy starts over. A unit begun
        and never ended (a step that failed half way) is settled first (its flag counts on:
        the next poll waits for the next partial)."""
        for part in self.pending.values():
            if isinstance(part, Future):
                wait([part])
        self.pending.clear()
        self._chore(self._run(self.filled.clear))

    def prepare(self, unit: int, k_pool, v_pool, end: int, written=None) -> None:
        """At the prefill: copy the unit's tokens [0, end) (what its first decode step reads
        on the CPU) once the write-back on stream `written` has landed, behind the GPU's work."""
        if end <= 0:
            return
        fill = lambda: self._fill(unit, k_pool, v_pool, end)
        if self.flags is None or written is None:
            self._chore(self._run(fill, *self._landed(written)))
            return
        n = self.prefills[unit] = self.prefills.get(unit, 0) + 1
        slot, flags = self._slot(PREFILLED, unit), self.flags
        flags.signal(slot, n, written)

        def after_write_back():
            flags.await_(slot, n, "the prefill's write-back to the pools")
            fill()
        self._chore(self._run(after_write_back))

    def _slot(self, kind: int, unit: int) -> int:
        """The unit's flag of one kind (_KINDS)."""
        return kind * self.num_units + unit

    def _chore(self, done) -> None:
        """Keep a worker's chore until it is done; one that failed raises at the next `end`."""
        if isinstance(done, Future):
            self.chores.append(done)

    def _reap(self) -> None:
        """Raise the first failure among the worker's finished jobs (it does not wait), or a
        poll that gave up waiting."""
        self._stalled()
        for jobs in (self.chores, self.inflight):
            while jobs and jobs[0].done():
                jobs.pop(0).result()

    def finish(self) -> None:
        """Wait for every job handed to the worker and raise the first failure: the end of a
        generate call (the host never waits for a partial before)."""
        for jobs in (self.chores, self.inflight):
            while jobs:
                jobs.pop(0).result()
        self._stalled()

    def _stalled(self) -> None:
        why = self.flags.timed_out(clear=True) if self.flags is not None else None  # once a stall
        if why:
            raise KvcError(f"the CPU attention lane stalled: {why} (its partial was merged "
                           "unfinished); run with schedule.cpu_attention=off")

    def _buffers(self, unit: int, q: torch.Tensor):
        """The unit's pinned query, output and lse buffers and, on the device, the partial's
        (made on first use, and anew for another batch: in `begin`, before the event the
        worker waits for, so no kernel issued before still uses the device buffers' memory)."""
        bufs = self.host.get(unit)
        if bufs is None or bufs[0].shape != q.shape or bufs[0].dtype != q.dtype:
            b, h, _ = q.shape
            bufs = self.host[unit] = (
                torch.empty(q.shape, dtype=q.dtype, pin_memory=True),
                torch.empty(q.shape, dtype=torch.float32, pin_memory=True),
                torch.empty((b, h), dtype=torch.float32, pin_memory=True),
                torch.empty(q.shape, dtype=torch.float32, device=self.device),
                torch.empty((b, h), dtype=torch.float32, device=self.device))
        return bufs

    def begin(self, unit: int, q: torch.Tensor, k_pool, v_pool, lo: int, c: int, scale: float,
              softcap: float, real, written=None) -> None:
        """q [b, H, hd] on the device; the unit's token-major pools k_pool, v_pool [rows, b,
        n_kv, hd] (token r at row r) and real [b, c] (or None) on the host: attend to tokens
        [lo, lo + c). On a GPU the query is copied down on the current stream and the worker
        waits for that copy, not the host, and for `written` (the write-back stream: rows it
        copies from the pool may have been written by copies still in flight)."""
        def attend(qh):
            self._fill(unit, k_pool, v_pool, lo + c)
            k_hm, v_hm = self.rows[unit]
            return partial_attention(qh, k_hm[:, :, lo:lo + c], v_hm[:, :, lo:lo + c], scale, softcap, real)
        if not self.cuda:
            self.pending[unit] = attend(q)
            return
        q_host, out_host, lse_host = self._buffers(unit, q)[:3]
        q_host.copy_(q, non_blocking=True)
        seq = self.seq[unit] = self.seq.get(unit, 0) + 1
        flags, posted = self.flags, self._slot(POSTED, unit)
        if flags is not None:  # the GPU tells the worker through flags: the worker calls no CUDA
            flags.signal(self._slot(QUERY, unit), seq, torch.cuda.current_stream(self.device))
            waits = [(self._slot(QUERY, unit), seq, "the query's copy to the host")]
            if written is not None:
                flags.signal(self._slot(LANDED, unit), seq, written)
                waits.append((self._slot(LANDED, unit), seq, "the write-back to the pools"))
        else:  # fresh events each step (a re-recorded event would make this job wait for the
            # unit's next step); blocking: the worker sleeps while it waits
            ev, landed = torch.cuda.Event(blocking=True), torch.cuda.Event(blocking=True)
            ev.record()
            landed.record(written)

        def job():
            try:  # the waits inside: whatever fails, the flag is written
                if flags is None:
                    ev.synchronize()  # the GIL is released while it waits
                    landed.synchronize()
                else:
                    for slot, value, what in waits:
                        flags.await_(slot, value, what)
                out, lse = attend(q_host)
                out_host.copy_(out)
                lse_host.copy_(lse)
            except BaseException:  # the stream waiting for this partial must not hang:
                out_host.fill_(math.nan)  # it merges NaN, and the failure raises at the reap
                lse_host.fill_(math.nan)
                raise
            finally:
                if flags is not None:
                    flags.post(posted, seq)
        self.pending[unit] = self._run(job)

    def end(self, unit: int):
        """(out [b, H, hd], lse [b, H]) float32 on the device, or None: no CPU part this step.
        On a GPU with the flag poll the host does not wait (only when it is AHEAD units ahead
        of the worker): the compute stream does. Without it (no NVRTC) the host waits."""
        self._reap()
        part = self.pending.pop(unit, None)
        if part is None or not self.cuda:
            return part
        _, out_host, lse_host, out, lse = self.host[unit]
        if self.flags is None:
            part.result()
            return out_host.to(self.device, non_blocking=True), lse_host.to(self.device, non_blocking=True)
        self.inflight.append(part)
        while len(self.inflight) > AHEAD:  # the host runs at most AHEAD units ahead of the CPU
            self.inflight.pop(0).result()
        self.flags.wait(self._slot(POSTED, unit), self.seq[unit], torch.cuda.current_stream(self.device))
        out.copy_(out_host, non_blocking=True)
        lse.copy_(lse_host, non_blocking=True)
        return out, lse

    def close(self) -> None:
        for part in [*self.chores, *self.inflight, *self.pending.values()]:
            if isinstance(part, Future):
                wait([part])
        self.pending.clear()
        self.chores.clear()
        self.inflight.clear()
        if self.cuda:  # no poll may still read the flags
            torch.cuda.current_stream(self.device).synchronize()
        if self.worker is not None:
            self.worker.shutdown(wait=True)
