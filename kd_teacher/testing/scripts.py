"""Scripts (examples/, benchmarks/) imported as modules by tests: they are not part of the package."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_script(path: str | Path) -> ModuleType:
    """The script at `path` as a module named after its file, imported once per process."""
    path = Path(path)
    name = path.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules[name]
