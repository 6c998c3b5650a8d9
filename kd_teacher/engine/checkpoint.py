"""Megatron-Core distributed checkpoints of a teacher: save, and load refusing one that does not fit.

Used by the engine (`TeacherEngine.from_checkpoint`, `reload_weights`) and by tools that write teachers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


class CheckpointMismatchError(ValueError):
    """A teacher checkpoint does not fit the model config it is loaded with."""


def save_checkpoint(model: torch.nn.Module, checkpoint_dir: str | Path) -> None:
    """Save with `megatron.core.dist_checkpointing` (torch_dist), loadable under another TP/PP layout."""
    from megatron.core import dist_checkpointing

    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(checkpoint_dir))


TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron-LM's, beside the iter_NNNNNNN directories


def resolve_checkpoint_dir(checkpoint_dir: str | Path, iteration: Optional[int] = None) -> Path:
    """The distributed-checkpoint directory meant by `checkpoint_dir`, as Megatron-LM's `--load` reads it.

    `checkpoint_dir` is a checkpoint itself (it has `metadata.json`), or a Megatron-LM `--save` directory:
    then `iter_{iteration:07d}` inside it, the iteration being `iteration` or else the one its
    `latest_checkpointed_iteration.txt` names (`release` for a released checkpoint).
    """
    path = Path(checkpoint_dir)
    if iteration is None and (path / "metadata.json").is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"teacher checkpoint {path} does not exist")
    if iteration is not None:
        chosen = path / f"iter_{iteration:07d}"
        if not chosen.is_dir():
            found = sorted(p.name for p in path.glob("iter_*"))
            raise FileNotFoundError(f"{path} has no checkpoint of iteration {iteration} ({chosen.name}); it has "
                                    f"{found or 'none'}")
    else:
        tracker = path / TRACKER_FILE
        if not tracker.is_file():
            raise FileNotFoundError(
                f"{path} is not a Megatron-Core distributed checkpoint (no metadata.json) nor a Megatron-LM --save "
                f"directory (no {TRACKER_FILE}); point at a checkpoint directory (iter_NNNNNNN)")
        text = tracker.read_text().strip()
        if text == "release":
            chosen = path / "release"
        elif text.isdigit():
            chosen = path / f"iter_{int(text):07d}"
        else:
            raise FileNotFoundError(f"{tracker} holds {text!r}, not an iteration number or 'release'")
    if not (chosen / "metadata.json").is_file():
        raise FileNotFoundError(f"{chosen} is not a Megatron-Core distributed checkpoint (no metadata.json): was it "
                                "saved with --ckpt-format torch_dist (Megatron-LM's default)?")
    return chosen


def load_checkpoint(
    model: torch.nn.Module,
    checkpoint_dir: str | Path,
    *,
    recipe=None,
    accept_initial_fp8_scales: bool = False,
    iteration: Optional[int] = None,
) -> None:
    """Load into `model` (`checkpoint_dir` and `iteration` as `resolve_checkpoint_dir` reads them). With an
    FP8 delayed-scaling `recipe` (a `PrecisionRecipe`), a checkpoint without FP8 scales is refused before
    anything is copied, unless `accept_initial_fp8_scales`."""
    path = resolve_checkpoint_dir(checkpoint_dir, iteration)
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
    except BaseException as e:  # noqa: BLE001 - torch DCP's CheckpointException derives from BaseException
        raise load_failure(e, path) from e


# Failures that say nothing about the checkpoint: memory, a collective or the network, the user or the system.
_NOT_THE_CHECKPOINT = (MemoryError, torch.OutOfMemoryError, torch.distributed.DistError, KeyboardInterrupt,
                       SystemExit, GeneratorExit)


def load_failure(error: BaseException, path) -> BaseException:
    """What to raise for `error` from a checkpoint load: CheckpointMismatchError when the checkpoint does not fit
    the model (Megatron-Core's validation, a missing key or a wrong shape on any rank, which torch DCP collects in
    a CheckpointException), `error` itself when it has another cause (out of memory, NCCL, an interrupt)."""
    from torch.distributed.checkpoint.api import CheckpointException

    causes = [error]
    if isinstance(error, CheckpointException):  # {rank: (exception, trace)} of every rank that failed
        causes += [cause for cause, _ in error.failures.values()]
    if any(isinstance(c, _NOT_THE_CHECKPOINT) for c in causes):
        return error
    return CheckpointMismatchError(f"checkpoint {path} does not match the model config: {type(error).__name__}: {error}")
