"""Loading a teacher: the teacher config YAML, Megatron-Core distributed checkpoints, engine construction.

A teacher config has three parts: `model:` (a `ModelConfig`), `engine:` (an `EngineConfig`: k, temperature,
batching) and `checkpoint:` (a `megatron.core.dist_checkpointing` directory; absent means random weights
from `model.seed`, which is what tests and benchmarks use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from kd_teacher.config import from_dict, load_yaml
from kd_teacher.engine.engine import EngineConfig, TeacherEngine
from kd_teacher.engine.model import ModelConfig, build_gpt_model


class CheckpointMismatchError(ValueError):
    """A teacher checkpoint does not fit the model config it is loaded with."""


@dataclass
class TeacherConfig:
    model: ModelConfig
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: Optional[str] = None


def load_teacher_config(path: str | Path, overrides: list[str] | None = None, section: str | None = None) -> TeacherConfig:
    data = load_yaml(path, overrides)
    if section is not None:
        data = data.get(section) or {}
    return from_dict(TeacherConfig, data, section or "")


def build_engine(cfg: TeacherConfig) -> TeacherEngine:
    """Build this rank's teacher (parallel_state initialised with the config's TP/PP) and its engine."""
    if cfg.checkpoint:
        return TeacherEngine.from_checkpoint(cfg.checkpoint, cfg.model, cfg.engine)
    torch.manual_seed(cfg.model.seed)
    model, _ = build_gpt_model(cfg.model)
    return TeacherEngine(model, cfg.model.vocab_size, cfg.engine, model_config=cfg.model)


def save_checkpoint(model: torch.nn.Module, checkpoint_dir: str | Path) -> None:
    """Save with `megatron.core.dist_checkpointing` (torch_dist), loadable under another TP/PP layout."""
    from megatron.core import dist_checkpointing

    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(checkpoint_dir))


def load_checkpoint(
    model: torch.nn.Module,
    checkpoint_dir: str | Path,
    *,
    recipe=None,
    accept_initial_fp8_scales: bool = False,
) -> None:
    """Load into `model`. With an FP8 delayed-scaling `recipe` (a `PrecisionRecipe`), a checkpoint without
    FP8 scales is refused before anything is copied, unless `accept_initial_fp8_scales`."""
    path = Path(checkpoint_dir)
    if not path.is_dir() or not (path / "metadata.json").exists():
        raise FileNotFoundError(f"{path} is not a Megatron-Core distributed checkpoint (no metadata.json)")
    if recipe is not None and recipe.delayed_scaling:
        # Only the small `_extra_state` objects first: dist_checkpointing loads into the model's own
        # tensors, so a refusal after the full load would already have overwritten the weights.
        from kd_teacher.engine.fp8_state import check_checkpoint_fp8_state, extra_state_request

        request = extra_state_request(model.sharded_state_dict())
        extra = _dist_load(request, path) if request else {}
        check_checkpoint_fp8_state(extra, recipe, str(path), accept_initial_scales=accept_initial_fp8_scales)
    state = _dist_load(model.sharded_state_dict(), path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "_extra_state" not in m]
    if missing:
        raise CheckpointMismatchError(f"checkpoint {path} lacks parameters {missing[:5]}")


def _dist_load(sharded_state_dict: dict, path: Path) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(sharded_state_dict, str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - torch DCP's CheckpointException derives from BaseException
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match the model config: {type(e).__name__}: {e}"
        ) from e
