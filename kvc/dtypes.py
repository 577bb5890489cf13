"""The model dtypes kvc runs in: config names, torch dtypes and element sizes, in one table."""
from __future__ import annotations

import torch

from kvc.errors import KvcError

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                  "float32": torch.float32}
NAMES = tuple(DTYPES)


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float16' (or a torch dtype) -> torch.float16; KvcError for anything else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise KvcError(f"unknown dtype {dtype!r}; expected one of {list(NAMES)}") from None


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a model dtype."""
    return torch_dtype(dtype).itemsize
