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

import torch.nn.functional as F


def attend(q, k, v, pad_mask, default_mask, prefill: bool, groups: int = 1, scale=None):
    """q [b, H, T, hd]; k, v [b, n_kv, S, hd]; `pad_mask` from kv_mask (empty: no padding);
    `default_mask`: the model's prefill mask without padding (a windowed layer's sliding
    causal mask; None: causal in prefill, nothing in decode). Returns [b, H, T, hd]."""
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


def mask_scores(scores, pad_mask, default_mask, groups: int):
    """Explicit attention's scores [b, n_kv, g*T, S] (query heads stacked per KV head) with
    -inf where the mask forbids: the padding mask when there is one, else `default_mask`
    ([T, S] or None: nothing masked)."""
    mask = pad_mask.unsqueeze(2) if pad_mask.numel() else default_mask
    if mask is None:
        return scores
    return scores.unflatten(2, (groups, -1)).masked_fill(~mask, float("-inf")).flatten(2, 3)


attend.kvc_attention = True
