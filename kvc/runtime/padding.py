"""Left padding: a batch of prompts of different lengths, the transformers way.

transformers pads a batch on the left (padding_side="left") and hands `attention_mask`
[b, p] (0: padding) to generate: row r's first pads[r] tokens are padding, its positions
count from its first real token (RoPE angles, OPT's learned positions), and no query attends
to a padding key. `Padding` holds that for one generate call, for every row of the cache
(the executor's micro-batch filler rows included): per-row positions [b, N] and which token
rows are real, and makes the mask `kv_mask` returns for any step and layer. The caches
(DeviceCache, OffloadedCache) ask it; without padding they answer an empty tensor and the
models attend exactly as before (kvc.models.attend).
"""
from __future__ import annotations

import torch

from kvc.errors import KvcError


def left_pads(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Padding tokens per row [b] (long, on the mask's device) of a transformers attention
    mask, checked: the input's shape, 0/1 values, left padding, a real token in every row."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise KvcError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, "
                       f"got {shape}")
    m = attention_mask
    if m.dtype != torch.bool and bool(((m != 0) & (m != 1)).any()):
        raise KvcError("attention_mask must hold 0 (padding) and 1 (token) only")
    m = m.bool()
    if bool((m[:, :-1] & ~m[:, 1:]).any()):
        raise KvcError("attention_mask pads on the right; kvc pads on the left like transformers' "
                       "generate (tokenizer padding_side='left'): each row's padding before its prompt")
    pads = (~m).sum(1)
    if bool((pads == m.shape[1]).any()):
        raise KvcError("attention_mask has a row with no token (all 0)")
    return pads


def cache_real(pads: torch.Tensor, tokens: int) -> torch.Tensor:
    """[b, tokens] bool: which of the first `tokens` token rows of each row are real."""
    return torch.arange(tokens, device=pads.device)[None] >= pads[:, None]


def without_padding(tokens: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
    """`tokens` [b, t] (a left-padded prompt, then what followed) with each row's padding
    replaced by its first real token: what a repetition penalty may read as the row's own
    tokens (a repeated token changes nothing there; a padding id would)."""
    first = tokens.gather(1, pads[:, None])
    return torch.where(cache_real(pads, tokens.shape[1]), tokens, first)


class Padding:
    """One generate call's left padding over a cache of `max_tokens` token rows."""

    def __init__(self, pads: torch.Tensor, max_tokens: int, device: torch.device):
        """`pads` [b]: on the host (a tokenizer's mask) or the device."""
        idx = torch.arange(max_tokens, device=device)
        self._pads_in, self._max_tokens = pads, max_tokens
        pads = pads.to(device, non_blocking=True)
        self.pads = pads
        # a padding token's position is clamped to 0: it is computed and never attended to
        self.positions = (idx[None] - pads[:, None]).clamp_min(0)  # [b, N]
        self.real = cache_real(pads, max_tokens)  # [b, N]: which token rows are real
        self._idx = idx

    @property
    def real_host(self) -> torch.Tensor:
        """`real` on the host, for the CPU attention lane (made once, from the host pads)."""
        if not hasattr(self, "_real_host"):
            self._real_host = cache_real(self._pads_in.cpu(), self._max_tokens)
        return self._real_host

    def mask(self, rows: slice, lo: int, s: int, t: int, window: int | None) -> torch.Tensor:
        """[b', 1, t, n] bool for the queries at token rows [s, s+t) of batch rows `rows`
        against the keys at [lo, s+t) (n = s+t-lo: what kv_read returns): causal, within the
        window, never a padding key; a padding query sees itself (no empty softmax row)."""
        real = self.real[rows, lo:s + t]
        if t == 1:  # decode: one query, the last key; lo already applies the window
            return real[:, None, None, :]
        q = self._idx[s:s + t, None]
        k = self._idx[None, lo:s + t]
        allowed = k <= q
        if window is not None:
            allowed = allowed & (q - k < window)
        return ((allowed[None] & real[:, None, :]) | (k == q)[None])[:, None]
