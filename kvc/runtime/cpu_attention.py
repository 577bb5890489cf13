"""The CPU attention lane (issue 17): decode attention over the oldest cached rows of an
offloaded layer, computed by the CPU in place in the pinned pool, beside the copies.

At a decode step an offloaded unit attends to its n cached tokens [lo, s). With the lane it
attends to the oldest c of them on the CPU, straight out of the token-major pinned K,V pools
(no copy of the cache), while the GPU attends to the rest (recomputed, copied, and the step's
own token). Each side returns its softmax's log-sum-exp with its output, and
kvc.models.attend.merge combines them exactly (the split-softmax merge of flash-decoding):

    out = (out_g * exp(lse_g - m) + out_c * exp(lse_c - m)) / (exp(lse_g - m) + exp(lse_c - m))

The query crosses to the host once per layer (b x heads x head_dim values) and the partial
comes back (b x heads x (head_dim + 1)). On a CUDA device the CPU work runs in one worker
thread (torch's CPU kernels release the GIL and use the intra-op thread pool), so the host
thread goes on issuing the GPU's work; `end` waits for it. On a CPU device it runs inline.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      softcap: float = 0.0, real: torch.Tensor | None = None):
    """One decode query per row against c cached rows. q [b, H, hd]; k, v [c, b, n_kv, hd]
    (token-major views of a pool, read in place); `real` [b, c] bool (False: a padding row,
    never attended). Returns (out [b, H, hd], lse [b, H]), float32; a row with no real key
    gets lse = -inf and out = 0 (it weighs nothing in the merge).

    The query heads sharing a KV head are stacked as query rows ([b, n_kv, g, hd]: no K,V
    repeated) and torch's CPU flash attention computes output and log-sum-exp in one pass
    over the strided pool rows; a soft-capped model (Gemma 2) goes through two GEMMs and the
    cap, which flash attention does not apply."""
    b, h, d = q.shape
    n_kv = k.shape[2]
    qg = q.reshape(b, n_kv, h // n_kv, d).to(k.dtype)
    kk, vv = k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)  # [b, n_kv, c, hd], views
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
    out = torch.matmul(probs.to(v.dtype), vv).float()  # [b, n_kv, g, hd]
    return out.reshape(b, h, d), lse.reshape(b, h)


def default_threads() -> int:
    """The lane's threads: the cores less two (the host thread issuing the GPU's work, the OS)."""
    return max(1, (os.cpu_count() or 2) - 2)


class CpuLane:
    """Per unit and step: `begin` hands the query to the CPU, `end` returns the partial on the
    device. Buffers are per unit: a unit's next query is copied only after its last partial
    was waited for, and the copy of a partial up precedes, on the compute stream, the copy
    down of the query the worker next waits for, so no buffer is overwritten in use."""

    def __init__(self, device: torch.device, num_units: int, threads: int = 0):
        self.device = torch.device(device)
        self.threads = threads or default_threads()
        self.cuda = self.device.type == "cuda"
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="kvc-cpu-attention") if self.cuda else None
        self.pending: dict[int, Future | tuple] = {}
        self.host: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.ready: dict[int, torch.cuda.Event] = {}
        self.written: dict[int, torch.cuda.Event] = {}
        self._threads_set = False

    def _buffers(self, unit: int, q: torch.Tensor):
        """The unit's pinned query, output and lse buffers (made on first use, and anew for
        another batch)."""
        bufs = self.host.get(unit)
        if bufs is None or bufs[0].shape != q.shape or bufs[0].dtype != q.dtype:
            b, h, _ = q.shape
            bufs = self.host[unit] = (
                torch.empty(q.shape, dtype=q.dtype, pin_memory=True),
                torch.empty(q.shape, dtype=torch.float32, pin_memory=True),
                torch.empty((b, h), dtype=torch.float32, pin_memory=True))
        return bufs

    def begin(self, unit: int, q: torch.Tensor, k, v, scale: float, softcap: float, real,
              written=None) -> None:
        """q [b, H, hd] on the device; k, v [c, b, n_kv, hd] and real [b, c] (or None) on the
        host. On a GPU the query is copied down on the current stream and the worker waits
        for that copy, not the host, and for `written` (the write-back stream: the pool rows
        it reads may have been written by copies still in flight, the prefill's above all)."""
        if not self.cuda:
            self.pending[unit] = partial_attention(q, k, v, scale, softcap, real)
            return
        q_host, out_host, lse_host = self._buffers(unit, q)
        q_host.copy_(q, non_blocking=True)
        ev = self.ready.setdefault(unit, torch.cuda.Event())
        ev.record()
        landed = self.written.setdefault(unit, torch.cuda.Event())
        landed.record(written)

        def job():
            if not self._threads_set:
                torch.set_num_threads(self.threads)
                self._threads_set = True
            ev.synchronize()  # the query has landed (the GIL is released while it waits)
            landed.synchronize()  # and every write-back issued before it
            with torch.inference_mode():  # as the caller's (inference mode is per thread)
                out, lse = partial_attention(q_host, k, v, scale, softcap, real)
                out_host.copy_(out)
                lse_host.copy_(lse)
            return out_host, lse_host

        self.pending[unit] = self.worker.submit(job)

    def end(self, unit: int):
        """(out [b, H, hd], lse [b, H]) float32 on the device, or None: no CPU part this step."""
        part = self.pending.pop(unit, None)
        if part is None or not self.cuda:
            return part
        out, lse = part.result()
        return out.to(self.device, non_blocking=True), lse.to(self.device, non_blocking=True)

    def close(self) -> None:
        for part in self.pending.values():
            if isinstance(part, Future):
                part.result()
        self.pending.clear()
        if self.worker is not None:
            self.worker.shutdown(wait=True)
