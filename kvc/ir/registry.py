"""Integer ids for runtime objects, so that generated graph code stays plain Python.

A traced graph takes the id as its `rt` input and passes it to every cache op; the op looks
the object up here. Nothing in a graph holds a closure, a stream or a tensor pool directly.
"""
from __future__ import annotations

import itertools
from typing import Any

_objects: dict[int, Any] = {}
_ids = itertools.count(1)


def register(obj: Any) -> int:
    rid = next(_ids)
    _objects[rid] = obj
    return rid


def get(rid: int) -> Any:
    try:
        return _objects[rid]
    except KeyError:
        raise RuntimeError(f"kvc runtime id {rid} is not registered (released, or never made)") from None


def release(rid: int) -> None:
    _objects.pop(rid, None)
