"""The floating-point dtypes of teacher values and model parameters: one table, by name, torch dtype and the code
that binary headers carry (`transport/reply_block.py`). Every dtype lookup of the package goes through here."""

from __future__ import annotations

import torch

# name (in configs, payload headers, manifests), torch dtype, wire code (fixed: a code is never reused)
_TABLE = (
    ("float32", torch.float32, 1),
    ("bfloat16", torch.bfloat16, 2),
    ("float16", torch.float16, 3),
)

DTYPES = {name: dtype for name, dtype, _ in _TABLE}
DTYPE_NAMES = {dtype: name for name, dtype, _ in _TABLE}
WIRE_CODES = {name: code for name, _, code in _TABLE}
WIRE_NAMES = {code: name for name, _, code in _TABLE}
INDEX_DTYPE = torch.int32  # global vocabulary ids of a payload


def dtype_named(name: str, what: str = "dtype") -> torch.dtype:
    """The torch dtype called `name`; ValueError naming the supported ones."""
    if name not in DTYPES:
        raise ValueError(f"{what} {name!r} is not supported (supported: {', '.join(DTYPES)})")
    return DTYPES[name]


def name_of(dtype: torch.dtype, what: str = "dtype") -> str:
    """The name of a supported torch dtype; ValueError naming the supported ones."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"{what} {dtype} is not supported (supported: {', '.join(DTYPES)})")
    return DTYPE_NAMES[dtype]


def exact_cast(source: str, target: str) -> bool:
    """Is every value of dtype `source` also a value of dtype `target`?"""
    return source == target or target == "float32"
