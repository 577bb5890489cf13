"""Text in, text out: prompts (texts, chat messages or token ids) through a CompiledModel.

`kvc.load` returns a `TextModel`: a CompiledModel (everything it has, `.generate` included)
with the checkpoint's tokenizer (`.tokenizer`, None when there is none) and `complete` /
`generate_text`. Prompts are tokenized, sorted by length and packed into batches of the
compiled batch size (left padding and an attention mask, transformers' way), so a batch pads
little; results come back in input order. A final batch with fewer rows is filled with copies
of its last row, finished at their first token: the pools and CUDA graphs of the compiled
batch size are reused instead of rebuilt for a new one.

Stopping, per row: the checkpoint's EOS ids (`eos`), a stop string in the decoded text
(`stop`: the text is cut before it), or its token budget (`length`: `max_new_tokens`, default
the compiled gen_len, and never past `model.max_context` tokens of prompt and new tokens, the
batch's padded prompt width counted). The host reads each step's tokens only when a stop
string or a streaming callback needs them; EOS and per-row budgets cost no extra sync.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvc.errors import KvcError
from kvc.runtime.executor import CompiledModel

SAMPLING = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class Completion:
    """One prompt's result. `token_ids`: the new tokens, the EOS that ended the row included
    (as transformers returns it); `text`: their decoded text without the EOS and cut before a
    stop string (None when the model has no tokenizer)."""

    text: str | None
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass
class Request:
    """One row to generate: its prompt's ids, its own token budget and stop strings."""

    ids: list[int]
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_messages(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) for m in x)


def encode(tokenizer, prompt, vocab: int, where: str = "prompt") -> list[int]:
    """A prompt's token ids: a text (tokenized), a chat (the checkpoint's chat template, with
    the assistant's turn opened) or a list of token ids (checked against the vocabulary)."""
    if isinstance(prompt, str) or is_messages(prompt):
        if tokenizer is None:
            raise KvcError(f"{where}: this model has no tokenizer (dummy weights, or none in the "
                           "checkpoint folder); pass token ids instead")
        if isinstance(prompt, str):
            ids = list(tokenizer.encode(prompt))
        else:
            if not hasattr(tokenizer, "apply_chat_template"):
                raise KvcError(f"{where}: chat messages need kvc.tokenizer's chat templates, "
                               "which this kvc does not have")
            ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
    elif isinstance(prompt, (list, tuple)) and all(_is_int(t) for t in prompt):
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise KvcError(f"{where}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    else:
        raise KvcError(f"{where}: expected a text, a list of chat messages (dicts) or a list of "
                       f"token ids, got {type(prompt).__name__}")
    if not ids:
        raise KvcError(f"{where}: the prompt is empty (no tokens)")
    return ids


def check_length(n: int, max_context: int, where: str = "prompt") -> None:
    if n >= max_context:
        raise KvcError(f"{where}: {n} tokens; this artifact serves at most {max_context} tokens per "
                       f"row, prompt and new tokens together, so a prompt may have at most "
                       f"{max_context - 1} (recompile with a larger workload.max_context)")


def eos_ids(model, eos_token_id=None) -> tuple[int, ...]:
    """The ids that end a row: as given (an id or a list; () for none), else the checkpoint's."""
    if eos_token_id is None:
        eos_token_id = getattr(model.spec, "eos_token_id", ()) or ()
    ids = (eos_token_id,) if _is_int(eos_token_id) else tuple(eos_token_id)
    vocab = model.spec.vocab_size
    if not all(_is_int(i) and 0 <= i < vocab for i in ids):
        raise KvcError(f"eos_token_id = {eos_token_id!r}; expected token ids in [0, {vocab})")
    return tuple(int(i) for i in ids)


def stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise KvcError(f"stop = {stop!r}; expected a non-empty string or a list of them")
    return stops


def check_sampling(sampling: dict) -> None:
    unknown = sorted(set(sampling) - set(SAMPLING))
    if unknown:
        raise KvcError(f"unknown generation setting {unknown[0]!r}; expected one of "
                       f"{', '.join(SAMPLING)}, max_new_tokens, stop, eos_token_id")


def batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (ties in input order), cut into batches of `batch_size`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


class _TailText:
    """A row's text so far, grown token by token: the tokenizer's stream decoder when it has
    one (never a partial character), else the decode of every token so far."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.text = tokenizer, [], ""
        self.dec = tokenizer.stream_decoder() if hasattr(tokenizer, "stream_decoder") else None

    def add(self, token: int) -> str:
        if self.dec is not None:
            piece = self.dec.add([token])
        else:
            self.ids.append(token)
            now = self.tok.decode(self.ids)
            piece = "" if now.endswith("\ufffd") or not now.startswith(self.text) else now[len(self.text):]
        self.text += piece
        return piece


def _first_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _budget(model, req: Request, width: int) -> int:
    n = model.workload[1] if req.max_new_tokens is None else req.max_new_tokens
    return max(1, min(n, model.max_context - width))


def run_batch(model, tokenizer, reqs: Sequence[Request], eos: tuple[int, ...], sampling: dict,
              on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """One generate call for `reqs` (at most the compiled batch size), left-padded."""
    b = len(reqs)
    rows = list(reqs) + [reqs[-1]] * max(0, model.batch_size - b)  # fill: see the docstring
    width = max(len(r.ids) for r in rows)
    pad_id = eos[0] if eos else 0
    ids = torch.tensor([[pad_id] * (width - len(r.ids)) + r.ids for r in rows])
    mask = None
    if any(len(r.ids) != width for r in rows):
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows])
    limits = [_budget(model, r, width) for r in reqs] + [1] * (len(rows) - b)
    n = max(limits)
    host = on_text is not None or any(r.stop for r in reqs)
    texts = [_TailText(tokenizer) for _ in reqs] if host else []
    stopped, ended = [None] * b, [False] * b
    shown = [0] * b
    hold = max((len(s) for r in reqs for s in r.stop), default=1) - 1

    def on_token(step: int, tokens):
        finish = [step == lim - 1 for lim in limits]
        if host:
            toks = tokens.tolist()
            for i in range(b):
                if ended[i] or step >= limits[i]:
                    continue
                if toks[i] in eos:
                    ended[i] = True
                    continue
                before = len(texts[i].text)
                texts[i].add(toks[i])
                text = texts[i].text
                if reqs[i].stop and _first_stop(text, reqs[i].stop, max(0, before - hold)) >= 0:
                    stopped[i], ended[i], finish[i] = step, True, True
                elif on_text is not None and len(text) - hold > shown[i]:
                    on_text(i, text[shown[i]:len(text) - hold])
                    shown[i] = len(text) - hold
            for i in range(b):
                ended[i] = ended[i] or finish[i]
        return finish if any(finish) else None

    need_calls = host or len(rows) > b or len(set(limits)) > 1
    out = model.generate(ids, n, on_token=on_token if need_calls else None,
                         eos_token_id=list(eos) or None, attention_mask=mask, **sampling)
    results = []
    for i, r in enumerate(reqs):
        new = out[i, width:].tolist()[:limits[i]]
        reason, keep = "length", len(new)
        for k, t in enumerate(new):
            if t in eos:
                reason, keep = "eos", k + 1
                break
            if stopped[i] == k:
                reason, keep = "stop", k + 1
                break
        toks = new[:keep]
        text = None
        if tokenizer is not None:
            text = tokenizer.decode(toks[:-1] if reason == "eos" else toks)
            cut = _first_stop(text, r.stop) if reason == "stop" else -1
            text = text[:cut] if cut >= 0 else text
        if on_text is not None and text is not None:
            done = texts[i].text[:shown[i]]
            if text.startswith(done) and len(text) > len(done):
                on_text(i, text[len(done):])
        results.append(Completion(text, toks, reason, len(r.ids)))
    return results


def run_requests(model, tokenizer, reqs: Sequence[Request], *, eos_token_id=None,
                 on_text: Callable[[int, str], None] | None = None,
                 **sampling) -> Iterator[tuple[list[int], list[Completion]]]:
    """(indices into `reqs`, their completions) batch by batch, shortest prompts first."""
    check_sampling(sampling)
    eos = eos_ids(model, eos_token_id)
    for k, r in enumerate(reqs):
        check_length(len(r.ids), model.max_context, f"prompt {k}")
        if r.max_new_tokens is not None and (not _is_int(r.max_new_tokens) or r.max_new_tokens < 1):
            raise KvcError(f"prompt {k}: max_new_tokens = {r.max_new_tokens!r}; expected an integer >= 1")
    for idx in batches([len(r.ids) for r in reqs], model.batch_size):
        show = None if on_text is None else (lambda i, piece, idx=idx: on_text(idx[i], piece))
        yield idx, run_batch(model, tokenizer, [reqs[i] for i in idx], eos, sampling, show)


def as_prompt_list(prompts) -> list:
    """str -> [str]; one chat (a list of dicts) or one list of ids -> [it]; else the list."""
    if isinstance(prompts, str) or is_messages(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(_is_int(t) for t in prompts):
        return [list(prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise KvcError("prompts: expected a text, a chat, token ids, or a non-empty list of them")
    return list(prompts)


class TextModel(CompiledModel):
    """A CompiledModel with its checkpoint's tokenizer and text-level generation."""

    tokenizer = None

    def complete(self, prompts, max_new_tokens: int | None = None, stop=None, *,
                 eos_token_id=None, on_text: Callable[[int, str], None] | None = None,
                 **sampling) -> list[Completion]:
        """Completions in input order. `prompts`: a text, a chat (list of message dicts), a
        list of token ids, or a list of any of these. `max_new_tokens` (default: the compiled
        gen_len) is capped by `max_context`; `stop`: string(s) that end a row; `eos_token_id`:
        an id or ids (default: the checkpoint's; () for none); `sampling`: generate's
        do_sample, temperature, top_k, top_p, repetition_penalty, seed. `on_text(i, piece)`:
        the i-th prompt's text as it grows (complete characters only; stop strings held back)."""
        items = as_prompt_list(prompts)
        stops = stop_strings(stop)
        reqs = [Request(encode(self.tokenizer, p, self.spec.vocab_size, f"prompt {k}"),
                        max_new_tokens, stops) for k, p in enumerate(items)]
        out: list[Completion | None] = [None] * len(reqs)
        for idx, done in run_requests(self, self.tokenizer, reqs, eos_token_id=eos_token_id,
                                      on_text=on_text, **sampling):
            for i, c in zip(idx, done):
                out[i] = c
        return out

    def generate_text(self, prompts, max_new_tokens: int | None = None, stop=None,
                      **settings) -> list[str]:
        """The completions' texts, in input order (see `complete`)."""
        if self.tokenizer is None:
            raise KvcError("generate_text needs a tokenizer, and this model has none (dummy "
                           "weights, or none in the checkpoint folder); use complete() with token ids")
        return [c.text for c in self.complete(prompts, max_new_tokens, stop, **settings)]
