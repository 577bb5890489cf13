"""Choosing the next token and stopping, with transformers' names and semantics.

`Sampler` turns a step's logits [b, vocab] into tokens [b]: greedy (argmax of the logits as
they are, what kvc always did) unless `do_sample`; with `do_sample`, on float32 logits (as
transformers' generate casts them): repetition penalty, then temperature, top-k, top-p (the
order of transformers' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, min_tokens_to_keep=1), softmax, torch.multinomial drawn
from a torch.Generator seeded with `seed` on the logits' device (None: torch's global RNG).
Defaults are transformers' GenerationConfig defaults (top_k=50 applies only when sampling).

`Stopping` is transformers' EOS rule: a row that emitted one of `eos_token_id` is finished,
its later tokens are `pad_token_id` (default: the first EOS id), and the batch is done when
every row is. The decoders (executor.py, reference.py) read `done` once per step, a host
sync that is paid only when an EOS id was given.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from kvc.errors import KvcError


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_max_new_tokens(max_new_tokens) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise KvcError(f"max_new_tokens = {max_new_tokens!r}; expected an integer >= 1")


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: every token in `seen` [b, t] (prompt and
    generated) has its score divided by `penalty` where positive, multiplied where negative."""
    score = torch.gather(scores, 1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, seen, score)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores / temperature


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` highest scores (ties with the k-th kept too), the rest -inf."""
    k = min(max(top_k, 1), scores.size(-1))
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, -math.inf)


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of tokens whose probability sums to >= top_p (at least
    the most likely one); transformers' TopPLogitsWarper, computed the same way."""
    sorted_scores, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), -math.inf)


class Sampler:
    """One generate call's token choice; a fresh Sampler with the same seed repeats its draws."""

    def __init__(self, do_sample: bool = False, temperature: float = 1.0, top_k: int = 50,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None):
        if not isinstance(do_sample, bool):
            raise KvcError(f"do_sample = {do_sample!r}; expected True or False")
        for name, v in (("temperature", temperature), ("top_p", top_p),
                        ("repetition_penalty", repetition_penalty)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise KvcError(f"{name} = {v!r}; expected a finite number")
        if do_sample and temperature <= 0:
            raise KvcError(f"temperature = {temperature}; expected > 0 when sampling "
                           "(do_sample=False decodes greedily)")
        if not _is_int(top_k) or top_k < 0:
            raise KvcError(f"top_k = {top_k!r}; expected an integer >= 0 (0: no top-k)")
        if not 0 < top_p <= 1:
            raise KvcError(f"top_p = {top_p}; expected 0 < top_p <= 1 (1: no nucleus filter)")
        if repetition_penalty <= 0:
            raise KvcError(f"repetition_penalty = {repetition_penalty}; expected > 0 (1: none)")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2 ** 63):
            raise KvcError(f"seed = {seed!r}; expected an integer in [0, 2**63) or None")
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.repetition_penalty, self.seed = repetition_penalty, None if seed is None else int(seed)
        self._generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        """Argmax of the raw logits: no host-visible difference from kvc's original decoding."""
        return not self.do_sample and self.repetition_penalty == 1.0

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """The sampling warpers, in transformers' order, each only when it changes something."""
        if self.temperature != 1.0:
            scores = apply_temperature(scores, self.temperature)
        if self.top_k != 0:
            scores = apply_top_k(scores, self.top_k)
        if self.top_p < 1.0:
            scores = apply_top_p(scores, self.top_p)
        return scores

    def _gen(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [b] from logits [b, vocab]; `seen` [b, t]: the tokens so far (the penalty's)."""
        if self.greedy:
            return logits.argmax(-1)
        scores = logits.float()
        if self.repetition_penalty != 1.0:
            scores = apply_repetition_penalty(scores, seen, self.repetition_penalty)
        if not self.do_sample:
            return scores.argmax(-1)
        probs = self.warp(scores).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self._gen(probs.device)).squeeze(1)


def _token_ids(value, name: str, vocab: int) -> list[int]:
    ids = [value] if not isinstance(value, (list, tuple)) else list(value)
    if not ids or not all(_is_int(i) and 0 <= i < vocab for i in ids):
        raise KvcError(f"{name} = {value!r}; expected a token id in [0, {vocab}) or a non-empty "
                       "list of them")
    return ids


class Stopping:
    """transformers' EOS rule over a batch of `batch` rows (no EOS ids: never stops)."""

    def __init__(self, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None,
                 batch: int, vocab: int, device: torch.device):
        self.eos = None
        self.device, self.batch = torch.device(device), batch
        if pad_token_id is not None and not _is_int(pad_token_id):
            raise KvcError(f"pad_token_id = {pad_token_id!r}; expected one token id")
        self.pad_id = None if pad_token_id is None else int(_token_ids(pad_token_id, "pad_token_id", vocab)[0])
        if eos_token_id is not None:
            eos = [int(i) for i in _token_ids(eos_token_id, "eos_token_id", vocab)]
            self.eos = torch.tensor(eos, device=device)
            self.pad = eos[0] if self.pad_id is None else self.pad_id
            self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """The step's tokens with finished rows' replaced by the pad; marks rows that end now."""
        if self.eos is None:
            return tokens
        tokens = torch.where(self.unfinished, tokens, torch.full_like(tokens, self.pad))
        self.unfinished &= ~torch.isin(tokens, self.eos)
        return tokens

    def finish(self, rows) -> None:
        """Mark `rows` (a bool per row, or None: nothing) finished, as if each had emitted an
        EOS now (a stop string the caller found): their later tokens are the pad."""
        if rows is None:
            return
        rows = torch.as_tensor(rows, dtype=torch.bool, device=self.device)
        if not bool(rows.any()):
            return
        if self.eos is None:  # no EOS ids: stop only on what the caller says; pad with 0
            self.eos = torch.empty(0, dtype=torch.long, device=self.device)
            self.pad = 0 if self.pad_id is None else self.pad_id
            self.unfinished = torch.ones(self.batch, dtype=torch.bool, device=self.device)
        self.unfinished &= ~rows

    @property
    def done(self) -> bool:
        """Every row finished (a host sync; False at no cost when there are no EOS ids)."""
        return self.eos is not None and not bool(self.unfinished.any())
