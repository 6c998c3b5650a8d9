"""Which repacked forward shapes give a sequence the same served top-k as its own micro-batch: a measured table.

Repacking (several student requests in one forward) changes the GEMM and attention shapes a sequence is
computed in. cuBLAS and the fused attention choose kernels by shape, and two kernels may reduce in different
orders, so even a bf16 teacher, whose recipe has no batch-wide scale, is not batch-invariant by construction.
`benchmarks/batch_invariance.py` measures it on the machine that serves: per model shape and sequence length,
the forward shapes [rows, padded length] in which the sequence came out bit for bit as scored alone. This module
reads that JSON and answers, for the scheduler, "may a row of length s run in a forward of this shape?".

A table applies only to the environment it was measured in (device name, torch, CUDA, cuDNN, Transformer
Engine) and the model's GEMM-relevant shape (widths, heads, padded vocabulary, TP, layer spec, dtype, FP8):
kernel choice follows those, not the weights or the number of layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch


class InvarianceTableError(ValueError):
    """A batch-invariance table that cannot be used: unreadable, or measured for another model or machine."""


def environment() -> dict:
    """What decides kernel choice besides shapes: the device and the libraries that ship the kernels."""
    env = dict(device="cpu", torch=torch.__version__, cuda=torch.version.cuda, cudnn=None,
               transformer_engine=_version("transformer_engine"))
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def _version(module: str) -> Optional[str]:
    import importlib

    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # noqa: BLE001 - not installed, or fails to import here (no GPU): no version to compare
        return None


def model_key(mcfg) -> dict:
    """The model's shape as far as kernel choice goes (a `ModelConfig`)."""
    p = mcfg.precision
    return dict(
        hidden_size=mcfg.hidden_size,
        ffn_hidden_size=mcfg.ffn_hidden_size or 4 * mcfg.hidden_size,
        num_attention_heads=mcfg.num_attention_heads,
        num_query_groups=mcfg.num_query_groups or mcfg.num_attention_heads,
        padded_vocab_size=mcfg.padded_vocab_size,
        tensor_model_parallel_size=mcfg.tensor_model_parallel_size,
        layer_spec=mcfg.layer_spec,
        params_dtype=p.params_dtype,
        fp8=p.fp8,
        fp8_recipe=p.fp8_recipe if p.fp8 else None,
    )


@dataclass(frozen=True)
class ProvenShapes:
    """Per sequence length, the forward shapes (rows, padded length) proven equal to scoring the sequence alone."""

    by_seq_len: dict  # int -> frozenset of (rows, padded_len)
    source: str

    def allows(self, seq_len: int, rows: int, padded_len: int) -> bool:
        if (rows, padded_len) == (1, seq_len):
            return True  # alone is the reference itself
        return (rows, padded_len) in self.by_seq_len.get(seq_len, frozenset())

    def max_rows(self, seq_len: int, budget_tokens: int) -> int:
        """The most rows of length `seq_len` that one unpadded forward may hold within the budget (>= 1)."""
        rows = [r for r, length in self.by_seq_len.get(seq_len, ()) if length == seq_len and r * length <= budget_tokens]
        return max(rows, default=1)


def load_proven_shapes(path: str | Path, mcfg, env: Optional[dict] = None) -> ProvenShapes:
    """The proven shapes for model `mcfg` in this environment from a `batch_invariance.py` JSON; an error naming
    what does not match when the table was measured for another model or machine."""
    try:
        data = json.loads(Path(path).read_text())
        models = data["models"]
        measured_env = data["environment"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvarianceTableError(f"batch-invariance table {path}: cannot read it ({type(e).__name__}: {e}); "
                                   "write one with benchmarks/batch_invariance.py --out PATH") from e
    env = env if env is not None else environment()
    differs = {k: (measured_env.get(k), v) for k, v in env.items() if measured_env.get(k) != v}
    if differs:
        raise InvarianceTableError(
            f"batch-invariance table {path} was measured in another environment: "
            + ", ".join(f"{k} {a!r} there vs {b!r} here" for k, (a, b) in sorted(differs.items()))
            + "; measure this machine with benchmarks/batch_invariance.py --config TEACHER.yaml --out PATH"
        )
    key = model_key(mcfg)
    for m in models:
        if isinstance(m, dict) and m.get("key") == key:
            proven = m.get("proven", {})
            return ProvenShapes({int(s): frozenset((int(r), int(n)) for r, n in shapes)
                                 for s, shapes in proven.items()}, str(path))
    raise InvarianceTableError(
        f"batch-invariance table {path} has no measurement of this model's shape {key} (it has "
        f"{[m.get('name') for m in models if isinstance(m, dict)]}); measure it with "
        "benchmarks/batch_invariance.py --config TEACHER.yaml --out PATH"
    )
