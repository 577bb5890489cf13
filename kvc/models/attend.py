"""Attention with the runtime's padding mask: the two functions every family attends through.

A batch of prompts of different lengths is left-padded (transformers' padding_side="left"):
row r's first pads[r] tokens are padding. The runtime's caches then answer
`torch.ops.kvc.kv_mask(rt, layer)` with a bool mask [b, 1, T, S], True where a query may
attend to a key (causal, the layer's window, never a padding key; a padding query sees
itself, so no row of the softmax is empty), for exactly the key rows `kv_read` returns. For
a batch without padding the answer is an empty tensor, and attention runs as it always did:
no mask in decode, `is_causal` (or the model's own window mask) in prefill, so the kernels
that take no mask (flash) keep running.

Which of the two applies is known only when the step runs, so these functions are leaves of
the traced graph (`torch.fx.wrap` in each family's module): the choice is made inside them,
at run time. `kvc_attention` marks them for the CUDA-graph partition (passes/cudagraphs.py):
like scaled_dot_product_attention, `attend`'s output has the query's shape whatever the
context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kvc.ir import registry


def merge(out_g: torch.Tensor, lse_g: torch.Tensor, out_c: torch.Tensor, lse_c: torch.Tensor):
    """The exact softmax over both sides' keys from each side's normalised output and its
    log-sum-exp (out [..., hd], lse [...], float32): flash-decoding's split-softmax merge. A
    side with no key (lse -inf) weighs nothing."""
    m = torch.maximum(lse_g, lse_c)
    m = torch.where(torch.isinf(m), 0.0, m)
    wg, wc = torch.exp(lse_g - m)[..., None], torch.exp(lse_c - m)[..., None]
    return (out_g * wg + out_c * wc) / (wg + wc)


def merge_all(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge` over any number of parts along dim 0 (outs [N, ..., hd], lses [N, ...]): the
    merged output and its log-sum-exp."""
    m = lses.amax(0)
    m = torch.where(torch.isinf(m), 0.0, m)
    w = torch.exp(lses - m)
    total = w.sum(0)
    out = (outs * w[..., None]).sum(0) / torch.where(total > 0, total, 1.0)[..., None]
    return out, m + torch.log(total)


def _has_parts(unit) -> bool:
    """Whether part of this unit's attention happens elsewhere this step (cpu_attn_begin's
    answer: the CPU lane, or the other ranks of a token split)."""
    return unit is not None and unit >= 0


def attend(q, k, v, pad_mask, default_mask, prefill: bool, groups: int = 1, scale=None,
           rt=None, unit=None):
    """q [b, H, T, hd]; k, v [b, n_kv, S, hd]; `pad_mask` from kv_mask (empty: no padding);
    `default_mask`: the model's prefill mask without padding (a windowed layer's sliding
    causal mask; None: causal in prefill, nothing in decode). `unit` (from cpu_attn_begin):
    other parts of this attention happen elsewhere (the CPU lane's oldest rows, other ranks'
    token shares), not in k, v: the runtime merges them exactly with this part.
    Returns [b, H, T, hd]."""
    if _has_parts(unit):
        return _attend_and_merge(q, k, v, pad_mask, groups, scale, rt, unit)
    if pad_mask.numel():
        mask, causal = pad_mask, False
    else:
        mask, causal = default_mask, prefill and default_mask is None
    if groups > 1 and not prefill:
        # one query row per head and step: the query heads sharing a KV head are stacked as
        # extra query rows, plain MHA kernels, and the cached K,V are never repeated (a
        # [b, 1, 1, S] mask broadcasts over the stacked rows)
        h, t = q.shape[1], q.shape[2]
        qg = q.unflatten(1, (h // groups, groups)).flatten(2, 3)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
        return out.unflatten(2, (groups, t)).flatten(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=groups > 1)


def _attend_and_merge(q, k, v, pad_mask, groups, scale, rt, unit):
    """Decode attention over k, v with its log-sum-exp, merged with the parts elsewhere."""
    b, h, t, d = q.shape
    qg = q.reshape(b, h // groups, groups * t, d)
    scores = _scores(qg, k) * (d ** -0.5 if scale is None else scale)
    if pad_mask.numel():
        scores = scores.masked_fill(~pad_mask, float("-inf"))
    return merge_scores(scores, v, rt, unit, q.dtype).reshape(b, h, t, d)


def _scores(qg, k):
    """q k^T in float32 ([b, n_kv, g*T, S]), as the attention kernels keep their scores: a
    half-precision product rounded to half precision would move the softmax (H200: logits off
    by 0.09 at opt-125m). On a GPU one batched GEMM with a float32 output; on a CPU in float32."""
    b, n_kv, g, d = qg.shape
    if qg.is_cuda and qg.dtype != torch.float32:
        kt = k.reshape(b * n_kv, -1, d).transpose(1, 2)
        return torch.bmm(qg.reshape(b * n_kv, g, d), kt, out_dtype=torch.float32).view(b, n_kv, g, -1)
    return torch.matmul(qg.float(), k.float().transpose(-1, -2))


def merge_scores(scores, v, rt, unit, dtype):
    """softmax(scores) @ v [b, n_kv, g*T, hd] (scores float32, -inf where masked), merged by
    the runtime (`merge_parts`) with the parts computed elsewhere (T = 1) in float32, cast to
    `dtype`. A row with no key here (lse -inf: a token share that is all padding, or empty)
    gives out 0, which weighs nothing."""
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    out = torch.matmul(probs.to(v.dtype), v).float()  # [b, n_kv, g, hd]
    out = torch.where(torch.isinf(lse)[..., None], 0.0, out)
    b, n_kv, g, d = out.shape
    merged = registry.get(rt).merge_parts(unit, out.reshape(b, n_kv * g, d), lse.reshape(b, n_kv * g))
    return merged.reshape(b, n_kv, g, d).to(dtype)


def softmax_attend(scores, v, rt=None, unit=None):
    """Explicit attention's last half (Gemma 2's soft-capped scores): softmax in float32, cast,
    times v ([b, n_kv, g*T, S] -> [b, n_kv, g*T, hd]), merged with the parts elsewhere when
    `unit` (from cpu_attn_begin) has some."""
    if not _has_parts(unit):
        return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)
    return merge_scores(scores.float(), v, rt, unit, v.dtype)


def mask_scores(scores, pad_mask, default_mask, groups: int):
    """Explicit attention's scores [b, n_kv, g*T, S] (query heads stacked per KV head) with
    -inf where the mask forbids: the padding mask when there is one, else `default_mask`
    ([T, S] or None: nothing masked)."""
    mask = pad_mask.unsqueeze(2) if pad_mask.numel() else default_mask
    if mask is None:
        return scores
    return scores.unflatten(2, (groups, -1)).masked_fill(~mask, float("-inf")).flatten(2, 3)


attend.kvc_attention = True
softmax_attend.kvc_attention = True
