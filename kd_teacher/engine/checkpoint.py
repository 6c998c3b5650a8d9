"""Megatron-Core distributed checkpoints of a teacher: save, and load refusing one that does not fit.

Used by the engine (`TeacherEngine.from_checkpoint`, `reload_weights`) and by tools that write teachers.
"""

from __future__ import annotations

from pathlib import Path

import torch


class CheckpointMismatchError(ValueError):
    """A teacher checkpoint does not fit the model config it is loaded with."""


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
