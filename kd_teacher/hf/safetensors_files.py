"""The `*.safetensors` files of a Hugging Face checkpoint: which file holds which tensor, and sliced reads.

Only safetensors are read: a pickle (`pytorch_model.bin`, `*.pt`) can run code when it is loaded, so a
directory that has nothing else is refused with the name of what it found. The tensor table comes from the
index (`model.safetensors.index.json`) when there is one, else from the headers of every `*.safetensors` file;
either way only headers are read to build it. `read(name, rows=, cols=)` reads just that block of a tensor
(safetensors' `get_slice`), so a TP rank reads its shard and nothing more.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

INDEX = "model.safetensors.index.json"
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class HFCheckpointError(ValueError):
    """The checkpoint's files are missing, unreadable or do not fit its config.json."""


@dataclass(frozen=True)
class TensorEntry:
    file: str
    shape: tuple
    dtype: str


class SafetensorsFiles:
    """The tensor table of a checkpoint directory; `open()` (a context manager) for reads."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory} is not a directory")
        index = self.directory / INDEX
        weight_map = self._weight_map(index) if index.is_file() else None
        files = self._files(weight_map)
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            try:
                with safe_open(str(self.directory / file), framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        self.entries[name] = TensorEntry(file, tuple(sl.get_shape()), str(sl.get_dtype()))
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise HFCheckpointError(f"{self.directory / file} is not a readable safetensors file: {e}") from e
        absent = sorted(set(weight_map or ()) - set(self.entries))
        if absent:
            raise HFCheckpointError(f"{index} lists {len(absent)} tensor(s) its files do not hold, e.g. {absent[:3]}")
        self._handles: Optional[dict] = None
        self.bytes_read = 0  # what `read` returned so far: at TP/EP > 1 a rank's share, not the checkpoint

    def _files(self, weight_map: Optional[dict]) -> list[str]:
        if weight_map is not None:
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.directory / f).is_file()]
            if missing:
                held = {f: sum(1 for v in weight_map.values() if v == f) for f in missing}
                raise HFCheckpointError(
                    f"missing shard(s) of {self.directory}: "
                    + ", ".join(f"{f} ({n} tensors, e.g. {next(k for k, v in weight_map.items() if v == f)})"
                                for f, n in held.items())
                    + f" are listed in {INDEX} but not on disk"
                )
            return files
        files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted({p.name for pattern in _PICKLES for p in self.directory.glob(pattern)})
        if pickles:
            raise HFCheckpointError(
                f"{self.directory} holds only PyTorch pickle weights ({', '.join(pickles[:3])}); kd-teacher reads "
                "safetensors only (a pickle can run code when loaded). Convert it once where you trust the file, "
                "e.g. AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out) writes safetensors"
            )
        raise HFCheckpointError(f"{self.directory} has no *.safetensors weights")

    @staticmethod
    def _weight_map(index: Path) -> dict:
        try:
            data = json.loads(index.read_text())
            weight_map = data["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise HFCheckpointError(f"{index} is not a safetensors index (weight_map): {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HFCheckpointError(f"{index}: weight_map is not a mapping of tensor names to file names")
        return weight_map

    # ---- reads ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def open(self):
        """Keep each file open (memory-mapped by safetensors) while the block runs."""
        with contextlib.ExitStack() as stack:
            self._handles = {}
            self._stack = stack
            try:
                yield self
            finally:
                self._handles = None

    def _handle(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(str(self.directory / file), framework="pt"))
        return self._handles[file]

    def read(self, name: str, rows: Optional[slice] = None, cols: Optional[slice] = None) -> torch.Tensor:
        """Tensor `name`, or just rows `rows` (dim 0) / columns `cols` (dim 1) of it."""
        if self._handles is None:
            raise RuntimeError("SafetensorsFiles.read outside `with files.open():`")
        entry = self.entries.get(name)
        if entry is None:
            raise HFCheckpointError(f"{self.directory} has no tensor {name}")
        sl = self._handle(entry.file).get_slice(name)
        rows = rows if rows is not None else slice(None)
        block = sl[rows] if cols is None else sl[rows, cols]
        self.bytes_read += block.numel() * block.element_size()
        return block

    @property
    def total_bytes(self) -> int:
        """The checkpoint files' bytes (what one rank would read without TP/EP slicing, plus small headers)."""
        return sum((self.directory / f).stat().st_size for f in {e.file for e in self.entries.values()})
