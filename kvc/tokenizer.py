"""The checkpoint's own tokenizer, from its folder only (never the hub).

`tokenizer.json` is read with the `tokenizers` library (a kvc dependency through
transformers or on its own); folders with only the older files (`vocab.json` +
`merges.txt`, `tokenizer.model`) go through transformers' AutoTokenizer when it is
installed, with `local_files_only=True`. Both give the same ids for a fast tokenizer, and
both add the model's special tokens (e.g. Llama's BOS) as the checkpoint's config says.
"""
from __future__ import annotations

from pathlib import Path

from kvc.errors import KvcError

# files AutoTokenizer can build a tokenizer from, besides tokenizer.json
_SLOW_FILES = ("tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


class Tokenizer:
    """encode(text) -> ids; decode(ids) -> text. A thin wrapper over either backend."""

    def __init__(self, backend, kind: str, folder: Path):
        self._t, self.kind, self.folder = backend, kind, folder

    def encode(self, text: str) -> list[int]:
        if self.kind == "tokenizers":
            return list(self._t.encode(text).ids)
        return list(self._t.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._t.decode(list(ids), skip_special_tokens=True)


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
