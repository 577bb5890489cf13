"""The checkpoint's own tokenizer, from its folder only (never the hub).

`tokenizer.json` is read with the `tokenizers` library (a kvc dependency through
transformers or on its own); folders with only the older files (`vocab.json` +
`merges.txt`, `tokenizer.model`) go through transformers' AutoTokenizer when it is
installed, with `local_files_only=True`. Both give the same ids for a fast tokenizer, and
both add the model's special tokens (e.g. Llama's BOS) as the checkpoint's config says.

Streaming (`Tokenizer.stream_decoder`): a character whose bytes span several tokens
(byte-level BPE: GPT-2/OPT, Llama 3, Qwen2; SentencePiece's byte fallback: Llama 2) is
emitted once its last byte has come, never as U+FFFD. The rule is vLLM's incremental
detokenizer's: decode a short window of ids twice, with and without the new ones, and emit
the difference unless it ends in U+FFFD (an incomplete character); the window starts a few
ids back, so a decoder's context rules (SentencePiece's leading space, clean-up of spaces
before punctuation) see the same neighbours as a decode of all ids.

Chat templates (`Tokenizer.apply_chat_template`) are the checkpoint's own
(tokenizer_config.json's `chat_template`, or chat_template.jinja), rendered by transformers.
"""
from __future__ import annotations

import json
import operator
import re
from pathlib import Path

from kvc.errors import KvcError

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# files AutoTokenizer can build a tokenizer from, besides tokenizer.json
_SLOW_FILES = ("tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


class Tokenizer:
    """encode(text) -> ids; decode(ids) -> text. A thin wrapper over either backend."""

    def __init__(self, backend, kind: str, folder: Path):
        self._t, self.kind, self.folder = backend, kind, folder
        self._hf = None  # transformers' tokenizer, loaded for a chat template when needed
        self._runs = None  # StreamDecoder's run_ids, found on first use

    def encode(self, text: str) -> list[int]:
        if self.kind == "tokenizers":
            return list(self._t.encode(text).ids)
        return list(self._t.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._t.decode(list(ids), skip_special_tokens=True)

    def stream_decoder(self, context: list[int] | tuple = ()) -> StreamDecoder:
        """An incremental detokenizer: `add(ids)` returns the text that is complete now,
        `finish()` the rest. What it emits, joined, is `decode(ids)` of every id added (text
        after `decode(context)` when `context` ids, e.g. the prompt's, come first: they are
        read for their effect on the next token's text, never emitted)."""
        return StreamDecoder(self.decode, context, self._run_ids())

    def _run_ids(self) -> frozenset:
        """Byte-fallback tokens (`<0x00>`..`<0xFF>`) and, if there are any, the special ids
        decode skips (they do not end a run of bytes); empty for byte-level BPE."""
        if self._runs is None:
            # a fast tokenizer of transformers decodes through its `tokenizers` backend
            fast = self._t if self.kind == "tokenizers" else getattr(self._t, "backend_tokenizer", None)
            if fast is not None:
                vocab = fast.get_vocab(with_added_tokens=False)
                special = [i for i, t in fast.get_added_tokens_decoder().items() if t.special]
            else:
                vocab = self._t.get_vocab()
                special = list(self._t.all_special_ids)
            byte_ids = [i for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t)]
            self._runs = frozenset(byte_ids + special) if len(byte_ids) >= 128 else frozenset()
        return self._runs

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The prompt ids of a conversation, rendered with the checkpoint's chat template by
        transformers (which needs jinja2). `messages`: [{"role": str, "content": str}, ...]."""
        messages = check_messages(messages)
        if not has_chat_template(self.folder):
            raise KvcError(f"{self.folder}: the checkpoint has no chat template (no chat_template "
                           "in tokenizer_config.json, no chat_template.jinja); give a plain prompt")
        hf = self._transformers()
        try:
            text = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                          tokenize=False)
        except ImportError as e:  # jinja2 missing or too old
            raise KvcError(f"chat templates need jinja2 ({_first_line(e)}); pip install jinja2") from None
        except Exception as e:  # a template error (jinja2's TemplateError, raise_exception(...))
            raise KvcError(f"{self.folder}: its chat template failed on these messages "
                           f"({_first_line(e)})") from None
        if not isinstance(text, str):
            raise KvcError(f"{self.folder}: its chat template rendered {type(text).__name__}, not text")
        # the template writes the special tokens (BOS, role markers) itself: add none
        return list(hf.encode(text, add_special_tokens=False))

    def _transformers(self):
        """transformers' tokenizer of the folder (the backend itself when it is one)."""
        if self.kind == "transformers":
            return self._t
        if self._hf is None:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise KvcError("chat templates need transformers (pip install transformers)") from None
            try:
                self._hf = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            except Exception as e:  # transformers raises many types (OSError, ValueError, ...)
                raise KvcError(f"{self.folder}: cannot load its tokenizer with transformers "
                               f"({_first_line(e)})") from None
        return self._hf


class StreamDecoder:
    """Text from ids as they come (Tokenizer.stream_decoder). Each `add` decodes the window
    ids[prefix:] and ids[prefix:read]; the text past the shorter one is new, and is emitted
    unless it ends in U+FFFD, which is what a decoder makes of a character whose remaining
    bytes are still to come (held back until they have). After an emission the window moves
    to start at the last emitted ids, so each step decodes a few ids, not all of them.

    Byte fallback (Llama 2's `<0xE4>` tokens) decodes a run of byte tokens as a whole: valid
    UTF-8, or U+FFFD for every byte. A later byte can therefore turn text that was whole into
    U+FFFD, so the ids of a run (`run_ids`: the byte tokens, and the special tokens decode
    skips inside a run) are held until an id that ends the run has come."""

    def __init__(self, decode, context=(), run_ids: frozenset = frozenset()):
        self._decode, self._run = decode, run_ids
        self._ids: list[int] = [_check_id(i) for i in context]
        # a few ids of context before the first new one (as vLLM), more where those few start
        # inside a character, all of them where even that does not help
        n, self._start, self._head = len(self._ids), 0, ""
        for back in (6, 12, 24, 48, n):
            start = max(0, n - back)
            while start > 0 and self._ids[start - 1] in self._run:
                start -= 1  # never inside a run of bytes
            self._start, self._head = start, (decode(self._ids[start:]) if n else "")
            if "\ufffd" not in self._head or start == 0:
                break
        self._prefix, self._read = self._start, n
        self._out: list[str] = []
        self._done = False

    def add(self, ids) -> str:
        """Append ids (a list, or one int); the text they complete ('' while a character
        spans ids still to come)."""
        if self._done:
            raise KvcError("stream decoder: add() after finish()")
        self._ids.extend(_check_id(i) for i in ([ids] if isinstance(ids, int) else ids))
        end = len(self._ids)
        while end > self._read and self._ids[end - 1] in self._run:
            end -= 1  # a run of bytes still open: its text may change
        if end == self._read:
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:end])
        if (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")
                or not new_text.startswith(prefix_text)):
            return ""  # nothing complete yet: the window grows until something is
        chunk = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, end
        self._out.append(chunk)
        return chunk

    def finish(self) -> str:
        """The text not yet emitted (an incomplete character as U+FFFD, as decode() writes
        it); then the decoder is closed."""
        if self._done:
            return ""
        self._done = True
        emitted = "".join(self._out)
        full = self._decode(self._ids[self._start:])
        if full.startswith(self._head) and full[len(self._head):].startswith(emitted):
            rest = full[len(self._head) + len(emitted):]
        else:  # a decoder whose text of all ids does not extend what was emitted
            prefix_text = self._decode(self._ids[self._prefix:self._read])
            rest = self._decode(self._ids[self._prefix:])[len(prefix_text):]
        self._out.append(rest)
        return rest

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._out)


def _check_id(i) -> int:
    try:
        v = operator.index(i)  # an int, or numpy's / torch's integer scalars
    except TypeError:
        v = None
    if v is None or isinstance(i, bool) or v < 0:
        raise KvcError(f"stream decoder: token id {i!r} is not an integer >= 0")
    return v


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def has_chat_template(folder) -> bool:
    """Whether a checkpoint folder names a chat template: tokenizer_config.json's
    `chat_template` (a string, or a list of named templates), or a chat_template.jinja."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and bool(cfg.get("chat_template"))


def check_messages(messages) -> list[dict]:
    """A conversation as chat templates take it: a non-empty list of {"role": str,
    "content": str}; KvcError naming the first message that is not."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise KvcError(f"messages: expected a non-empty list of {{\"role\": ..., \"content\": ...}}, "
                       f"got {str(messages)[:60]!r}")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict):
            raise KvcError(f"messages[{n}]: expected {{\"role\": str, \"content\": str}}, got "
                           f"{type(m).__name__}")
        odd = sorted(set(m) - {"role", "content"})
        if odd:
            raise KvcError(f"messages[{n}]: unknown keys {odd}; a message has 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise KvcError(f"messages[{n}].{key}: expected a string, got {str(m.get(key))[:40]!r}")
        if not m["role"]:
            raise KvcError(f"messages[{n}].role: empty; e.g. 'system', 'user' or 'assistant'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def load_tokenizer(folder) -> Tokenizer:
    folder = Path(folder)
    if not folder.is_dir():
        raise KvcError(f"{folder}: checkpoint folder not found; the tokenizer is read from it")
    if (folder / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer as Fast
        except ImportError:
            Fast = None
        if Fast is not None:
            try:
                return Tokenizer(Fast.from_file(str(folder / "tokenizer.json")), "tokenizers", folder)
            except Exception as e:  # the library raises a bare Exception on a bad file
                raise KvcError(f"{folder / 'tokenizer.json'}: not a readable tokenizer "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if (folder / "tokenizer.json").is_file() or any((folder / f).is_file() for f in _SLOW_FILES):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise KvcError(f"{folder}: reading this tokenizer needs the `tokenizers` library or "
                           "transformers; pip install tokenizers") from None
        try:
            return Tokenizer(AutoTokenizer.from_pretrained(str(folder), local_files_only=True),
                             "transformers", folder)
        except Exception as e:  # transformers raises many types (OSError, ValueError, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KvcError(f"{folder}: cannot load its tokenizer with transformers ({first})") from None
    raise KvcError(f"{folder}: the checkpoint has no tokenizer (expected tokenizer.json, "
                   "tokenizer.model or vocab.json + merges.txt); copy the tokenizer files of the "
                   "model into it, or pass token ids with --prompt-ids")
