"""kvc: decode LLMs with the KV cache offloaded to CPU memory, compiled with torch.fx.

    import kvc
    path = kvc.compile("examples/tiny-opt.yaml", overrides=["schedule.mode=kvpr"], output="out.kvc")
    model = kvc.load(path)
    tokens = model.generate(input_ids, max_new_tokens=32)
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# Installed, passes/ and conf/ live inside the package (kvc.passes, kvc.conf). In a source
# checkout on sys.path (PYTHONPATH=., `python -m` from the repo root) they sit beside kvc/:
# let the package find its subpackages there too.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "passes")) and all(
        _os.path.isfile(_os.path.join(_root, d, "__init__.py")) for d in ("passes", "conf")):
    __path__.append(_root)  # noqa: F821 (a package's own __path__)
__all__ = ["compile", "load", "CompiledModel", "KvcError", "__version__"]

from kvc.errors import KvcError


def compile(config, overrides=(), output=None):  # noqa: A001 - the verb users expect
    """Python twin of `kvc compile`: a model.yaml path (or dict) -> artifact folder Path."""
    from kvc.api import compile_artifact

    return compile_artifact(config, overrides=list(overrides), output=output)


def load(path, device=None):
    """Rebuild a compiled artifact into a CompiledModel with `.generate(...)`."""
    from kvc.artifact import load_artifact

    return load_artifact(path, device=device)


def __getattr__(name):
    if name == "CompiledModel":
        from kvc.runtime.executor import CompiledModel

        return CompiledModel
    raise AttributeError(name)
