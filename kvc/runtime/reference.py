"""The reference decoder: eager PyTorch, device-resident cache, greedy or sampled (with EOS
stopping). What compiled schedules must reproduce token for token, and what the parity tests
hold against Hugging Face.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kvc.ir import registry
from kvc.models.spec import ModelSpec
from kvc.runtime.attention import backends
from kvc.runtime.device_cache import DeviceCache
from kvc.runtime.padding import Padding, left_pads, without_padding
from kvc.runtime.sampling import Sampler, Stopping


class ReferenceDecoder:
    def __init__(self, model: nn.Module, spec: ModelSpec):
        self.model = model
        self.spec = spec

    def _cache(self, batch: int, max_tokens: int) -> tuple[DeviceCache, int]:
        w = next(self.model.parameters())
        cache = DeviceCache(self.spec.num_layers, batch, max_tokens, self.spec.num_kv_heads,
                            self.spec.head_dim, w.dtype, w.device,
                            windows={i: self.spec.window(i) for i in range(self.spec.num_layers)})
        return cache, registry.register(cache)

    @torch.inference_mode()
    @backends()  # the attention kernels compiled models use (kvc.runtime.attention)
    def prefill_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits at every prompt position, [b, s, vocab], in the model dtype."""
        b, s = input_ids.shape
        cache, rt = self._cache(b, s)
        try:
            positions = torch.arange(s, device=input_ids.device)
            return self.model(input_ids, positions, rt, prefill=True)
        finally:
            registry.release(rt)

    @torch.inference_mode()
    @backends()  # the attention kernels compiled models use (kvc.runtime.attention)
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, return_logits: bool = False,
                 *, do_sample: bool = False, temperature: float = 1.0, top_k: int = 50,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None):
        """Tokens [b, s+n], and with return_logits the logits [b, n, vocab] that chose each new
        token (logits[:, 0] come from the prefill's last position). Greedy unless `do_sample`;
        sampling and EOS stopping exactly as CompiledModel.generate (kvc.runtime.sampling), so
        n < max_new_tokens when every row emitted an EOS id before the last step.
        `attention_mask`: transformers' left padding, as CompiledModel.generate."""
        b, s = input_ids.shape
        device = input_ids.device
        pads = None if attention_mask is None else left_pads(attention_mask, input_ids).to(device)
        sampler = Sampler(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        stopping = Stopping(eos_token_id, pad_token_id, b, self.spec.vocab_size, device)
        # the last new token is never fed back, so s + n - 1 slots would do; one spare is cheap
        cache, rt = self._cache(b, s + max_new_tokens)
        if pads is not None and bool(pads.any()):
            cache.padding = Padding(pads, s + max_new_tokens, device)

        def positions(lo: int, t: int) -> torch.Tensor:
            if cache.padding is None:
                return torch.arange(lo, lo + t, device=device)
            return cache.padding.positions[:, lo:lo + t]

        def history() -> torch.Tensor:  # the tokens so far, a row's padding replaced by its first token
            seen = torch.cat(tokens, dim=1).long()
            return seen if cache.padding is None else without_padding(seen, cache.padding.pads)

        tokens, logits = [input_ids], []
        try:
            if max_new_tokens > 0:
                out = self.model(input_ids, positions(0, s), rt, prefill=True, last_only=True)
                cache.advance(s)
                for i in range(max_new_tokens):
                    step = out[:, -1]
                    logits.append(step)
                    seen = history() if sampler.repetition_penalty != 1.0 else None
                    nxt = stopping(sampler(step, seen))[:, None]
                    tokens.append(nxt)
                    if i + 1 == max_new_tokens or stopping.done:
                        break
                    out = self.model(nxt, positions(s + i, 1), rt)
                    cache.advance(1)
        finally:
            registry.release(rt)
        out_tokens = torch.cat(tokens, dim=1)
        if not return_logits:
            return out_tokens
        vocab = self.spec.vocab_size
        stacked = torch.stack(logits, dim=1) if logits else input_ids.new_empty((b, 0, vocab), dtype=torch.float32)
        return out_tokens, stacked

    def generate_in_micro_batches(self, input_ids: torch.Tensor, max_new_tokens: int,
                                  micro_batches: int, return_logits: bool = False):
        """`generate` on each of `micro_batches` equal slices of the batch, concatenated: what
        the block schedule computes (passes/microbatch.py), GEMMs of b/m rows included. The
        sequences do not interact, so this is the same decode; but fp16 GEMMs of 2 rows and of
        4 round differently, and a greedy near-tie may then pick another token, which a
        reference of the whole batch would call an error (H200, opt-125m ×4 weights,
        2026-11-28: token 65 of 96 flips in fp16, never in fp32). Greedy only: slices would
        draw their own samples and stop on their own, which the compiled model does not."""
        b = input_ids.shape[0]
        if b % micro_batches:
            raise ValueError(f"batch {b} does not split into {micro_batches} equal micro-batches")
        parts = [self.generate(x, max_new_tokens, return_logits)
                 for x in input_ids.split(b // micro_batches)]
        if not return_logits:
            return torch.cat(parts)
        return torch.cat([t for t, _ in parts]), torch.cat([lg for _, lg in parts])
