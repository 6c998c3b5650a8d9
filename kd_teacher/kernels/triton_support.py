"""What the kernel launchers share: whether Triton runs interpreted, and loading a Triton kernels module.

Kernel modules import `triton` at their top, so they are loaded lazily: where Triton is absent (CPU-only
installs) the launchers return None and their callers run the PyTorch reference path.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType
from typing import Optional

log = logging.getLogger(__name__)


def interpreting() -> bool:
    """TRITON_INTERPRET=1: the kernels run on CPU tensors through Triton's interpreter (tests, CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def kernels_module(name: str) -> Optional[ModuleType]:
    """`kd_teacher.kernels.<name>`, or None where Triton is not installed."""
    try:
        return importlib.import_module(f"kd_teacher.kernels.{name}")
    except ImportError as e:
        log.debug("Triton kernels %s unavailable: %s", name, e)
        return None
