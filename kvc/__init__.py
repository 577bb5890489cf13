"""kvc: decode LLMs with the KV cache offloaded to CPU memory, compiled with torch.fx.

    import kvc
    path = kvc.compile("examples/tiny-opt.yaml", overrides=["schedule.mode=kvpr"], output="out.kvc")
    model = kvc.load(path)
    tokens = model.generate(input_ids, max_new_tokens=32)
"""
from __future__ import annotations

__all__ = ["compile", "load", "CompiledModel", "KvcError", "__version__"]

from kvc.errors import KvcError
from kvc.version import __version__


def compile(config, overrides=(), output=None):  # noqa: A001 - the verb users expect
    """Python twin of `kvc compile`: a model.yaml path (or dict) -> artifact folder Path."""
    from kvc.api import compile_artifact

    return compile_artifact(config, overrides=list(overrides), output=output)


def load(path, device=None):
    """Rebuild a compiled artifact into a CompiledModel with `.generate(...)`."""
    from kvc.api import load_artifact

    return load_artifact(path, device=device)


def __getattr__(name):
    if name == "CompiledModel":
        from kvc.runtime.executor import CompiledModel

        return CompiledModel
    raise AttributeError(name)
