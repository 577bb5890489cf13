"""kvc: decode LLMs with the KV cache offloaded to CPU memory, compiled with torch.fx.

    import kvc
    path = kvc.compile("examples/tiny-opt.yaml", overrides=["schedule.mode=kvpr"], output="out.kvc")
    model = kvc.load(path)
    tokens = model.generate(input_ids, max_new_tokens=32)       # token ids in, token ids out
    texts = model.generate_text(["Hello,"], max_new_tokens=32)  # with the checkpoint's tokenizer
"""
from __future__ import annotations

__all__ = [
    "CompiledModel",
    "Completion",
    "KvcError",
    "TextModel",
    "__version__",
    "compile",
    "load",
]

from kvc.errors import KvcError
from kvc.version import __version__


def compile(config, overrides=(), output=None):  # shadows the builtin: the verb users expect
    """Python twin of `kvc compile`: a model.yaml path (or dict) -> artifact folder Path."""
    from kvc.api import compile_artifact

    return compile_artifact(config, overrides=list(overrides), output=output)


def load(path, device=None):
    """Rebuild a compiled artifact into a TextModel: a CompiledModel (`.generate(...)` on token
    ids) with the checkpoint's `.tokenizer` (None if it has none) and `.generate_text(...)` /
    `.complete(...)` on texts, chats or token ids (kvc.text)."""
    from kvc.api import load_artifact

    return load_artifact(path, device=device)


def __getattr__(name):
    if name == "CompiledModel":
        from kvc.runtime.executor import CompiledModel

        return CompiledModel
    if name in ("TextModel", "Completion"):
        import kvc.text

        return getattr(kvc.text, name)
    raise AttributeError(name)
