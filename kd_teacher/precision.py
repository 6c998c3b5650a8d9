"""The teacher's precision recipe, derived from the training `TransformerConfig`, and its fingerprint.

One place decides what numeric recipe a forward runs under (bf16/fp32, or Transformer Engine FP8 with a
given scaling recipe) and what that implies for the engine: whether outputs are batch-invariant (so requests
may be repacked) or depend on the whole micro-batch (so each micro-batch runs exactly as given).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Optional

import torch


class RecipeMismatchError(ValueError):
    """The payload's precision recipe is not the one this run trains under."""


@dataclass(frozen=True)
class PrecisionRecipe:
    params_dtype: str
    fp8: Optional[str] = None
    fp8_recipe: Optional[str] = None
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"
    fp8_param: bool = False
    first_last_layers_bf16: bool = False
    num_layers_at_start_in_bf16: int = 0
    num_layers_at_end_in_bf16: int = 0
    te_version: Optional[str] = None
    mcore_version: Optional[str] = None

    @classmethod
    def from_transformer_config(cls, config) -> "PrecisionRecipe":
        """Read the recipe off a Megatron-Core `TransformerConfig` (the training run's own)."""
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[config.params_dtype]
        fp8 = getattr(config, "fp8", None)
        if not fp8:
            return cls(params_dtype=dtype, mcore_version=_mcore_version())
        recipe = getattr(config, "fp8_recipe", "delayed")
        recipe = getattr(recipe, "value", recipe)  # Fp8Recipe enum or plain string
        delayed = recipe == "delayed"
        return cls(
            params_dtype=dtype,
            fp8=str(fp8),
            fp8_recipe=str(recipe),
            # margin / amax history only shape the delayed-scaling recipe; recording them for the others
            # would make two identical runs look different.
            fp8_margin=int(config.fp8_margin) if delayed else 0,
            fp8_amax_history_len=int(config.fp8_amax_history_len) if delayed else 1,
            fp8_amax_compute_algo=str(config.fp8_amax_compute_algo) if delayed else "most_recent",
            fp8_param=bool(getattr(config, "fp8_param", False)),
            first_last_layers_bf16=bool(getattr(config, "first_last_layers_bf16", False)),
            num_layers_at_start_in_bf16=int(getattr(config, "num_layers_at_start_in_bf16", 0) or 0)
            if getattr(config, "first_last_layers_bf16", False) else 0,
            num_layers_at_end_in_bf16=int(getattr(config, "num_layers_at_end_in_bf16", 0) or 0)
            if getattr(config, "first_last_layers_bf16", False) else 0,
            te_version=_te_version(),
            mcore_version=_mcore_version(),
        )

    @property
    def name(self) -> str:
        return f"fp8-{self.fp8_recipe}" if self.fp8 else self.params_dtype

    @property
    def batch_invariant(self) -> bool:
        """Does a sequence's output not depend on what else is in its micro-batch?

        Per-tensor current scaling ("tensorwise") takes one amax over the whole activation tensor, so it is
        not; delayed scaling in teacher mode uses frozen scales, block/mx scaling are per block.
        """
        return self.fp8_recipe != "tensorwise"

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"{self.name}:" + hashlib.blake2b(blob, digest_size=8).hexdigest()


def _te_version() -> Optional[str]:
    try:
        import transformer_engine

        return str(transformer_engine.__version__)
    except Exception:  # noqa: BLE001 - TE absent or broken: no version to record
        return None


def _mcore_version() -> Optional[str]:
    try:
        from megatron.core import package_info

        return str(package_info.__version__)
    except Exception:  # noqa: BLE001
        return None


def check_recipe(payload_fingerprint: str, expected: str, *, allow_mismatch: bool = False) -> None:
    """Refuse a payload made under another precision recipe than this run's (unless told to accept it)."""
    if payload_fingerprint == expected or allow_mismatch:
        return
    raise RecipeMismatchError(
        f"teacher payload was produced under precision recipe {payload_fingerprint!r} but this run uses "
        f"{expected!r}; set kd.allow_recipe_mismatch: true to accept it deliberately"
    )
