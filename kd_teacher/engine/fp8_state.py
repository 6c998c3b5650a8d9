"""Transformer Engine's FP8 runtime state around teacher passes: scales, amax histories, weight-cast caches.

Three facts about TE (read in TE 2.20.2 and megatron-core 0.16.1 / 0.19.2) shape this module:

- Delayed scaling keeps per-module `fp8_meta["scaling_fwd"/"scaling_bwd"]` with a `scale` and an
  `amax_history`. Every FP8 forward writes its amax into `amax_history[0]`, grad-enabled or not; scales are
  recomputed from the history only when an `fp8_autocast` exits with grad enabled
  (`FP8GlobalStateManager.autocast_exit`). So a teacher pass (no grad) never changes the scales, but it
  does leave its amax behind for the next grad-enabled forward, and a training-path forward (grad enabled,
  used by the consistency check) moves the scales. `preserved_fp8_state` snapshots both and puts them back,
  so teacher passes and the consistency check leave the recipe state exactly as they found it.
- Those scales come with the checkpoint, in each TE module's `_extra_state` (TE stores a pickled dict with
  `scale_fwd`, `amax_history_fwd`, ...). A checkpoint without them leaves the initial scales (1.0), which
  no teacher pass will ever correct: `check_checkpoint_fp8_state` refuses that unless told otherwise. We
  only scan the pickle's opcodes for those keys (`pickletools.genops` executes nothing); loading it is TE's
  business, and TE >= 2.20 refuses unless `NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1`.
- Megatron's TE wrappers keep an `is_first_microbatch` flag: True makes TE re-cast the weights to FP8 and
  cache the cast, False reuses the cache. Megatron's pipeline schedules set it at the first micro-batch of
  every call; a forward outside the schedules after weights changed in place would use stale casts.
  `reset_fp8_weight_caches` sets the flag on every module that has it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickletools
from typing import Optional

import torch

from kd_teacher.precision import PrecisionRecipe

log = logging.getLogger(__name__)

_DELAYED_STATE_KEYS = ("scaling_fwd", "scaling_bwd")
_DELAYED_EXTRA_STATE_MARKERS = {"scale_fwd", "amax_history_fwd"}


class MissingFP8StateError(ValueError):
    """A delayed-scaling teacher checkpoint carries no FP8 scales."""


# ---- checkpoint: does it carry delayed-scaling scales? --------------------------------------------------------
def extra_state_has_delayed_scales(value) -> bool:
    """Does one `_extra_state` value (as loaded from a checkpoint) hold TE delayed-scaling scales?"""
    if isinstance(value, io.BytesIO):  # TE 1.x format
        data = value.getvalue()
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.numel() > 0:
        data = value.detach().cpu().numpy().tobytes()
    else:  # None (Megatron's local layers), an empty tensor (a TE module that never ran in FP8), ...
        return False
    found = set()
    try:
        for _, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and arg in _DELAYED_EXTRA_STATE_MARKERS:
                found.add(arg)
    except Exception:  # noqa: BLE001 - not a pickle stream: not TE's delayed-scaling state either
        return False
    return found == _DELAYED_EXTRA_STATE_MARKERS


def extra_state_request(sharded_state_dict: dict) -> dict:
    """The `_extra_state` entries of a model's sharded state dict: what to load to inspect FP8 scales."""
    return {k: v for k, v in sharded_state_dict.items() if _is_extra_state_key(k)}


def _is_extra_state_key(key: str) -> bool:
    # `..._extra_state`, and `..._extra_state{i}` for Megatron's grouped (MoE) TE linears in dist checkpoints
    return key.rsplit(".", 1)[-1].startswith("_extra_state")


def check_checkpoint_fp8_state(
    state_dict: dict, recipe: PrecisionRecipe, checkpoint: str, *, accept_initial_scales: bool = False
) -> None:
    """Refuse a delayed-scaling teacher checkpoint whose `_extra_state` entries hold no scales."""
    if not recipe.delayed_scaling:
        return
    extra = {k: v for k, v in state_dict.items() if _is_extra_state_key(k)}
    with_scales = sum(extra_state_has_delayed_scales(v) for v in extra.values())
    if with_scales:
        log.info("checkpoint %s: FP8 delayed-scaling scales in %d of %d modules", checkpoint, with_scales, len(extra))
        return
    message = (
        f"teacher checkpoint {checkpoint} has no FP8 delayed-scaling state (scales, amax history) in any of its "
        f"{len(extra)} `_extra_state` entries, but the teacher runs under {recipe.describe()}. Teacher passes "
        "never update scales, so it would run with the initial scales (1.0) instead of the ones its training "
        "ended with. Load a checkpoint saved after FP8 training steps, or set engine.accept_initial_fp8_scales: "
        "true to accept the initial scales"
    )
    if not accept_initial_scales:
        raise MissingFP8StateError(message)
    log.warning("%s (accepted: engine.accept_initial_fp8_scales)", message)


# ---- scales and amax histories, left as they were found -------------------------------------------------------
def _delayed_meta_states(module: torch.nn.Module) -> list:
    """The delayed-scaling recipe states of one TE module (objects with `scale` and `amax_history`)."""
    meta = getattr(module, "fp8_meta", None)
    if not isinstance(meta, dict):
        return []
    states = [meta.get(key) for key in _DELAYED_STATE_KEYS]
    return [s for s in states if hasattr(s, "scale") and hasattr(s, "amax_history")]


def fp8_scaling_snapshot(model: torch.nn.Module) -> dict:
    """{module name: [(scale, amax_history) clones]} of every module with delayed-scaling state."""
    snapshot = {}
    for name, module in model.named_modules():
        states = _delayed_meta_states(module)
        if states:
            snapshot[name] = [(s.scale.detach().clone(), s.amax_history.detach().clone()) for s in states]
    return snapshot


@contextlib.contextmanager
def preserved_fp8_state(model: torch.nn.Module):
    """Run the body and put every delayed-scaling scale and amax history back as it was.

    In place (`copy_`): TE's global amax buffers hold views of these very tensors. A module that had no
    state yet (first FP8 forward inside the body) is put back to TE's initial state: scale 1, history 0.
    """
    modules = [m for m in model.modules() if isinstance(getattr(m, "fp8_meta", None), dict)]
    saved = {
        m: [(s.scale.detach().clone(), s.amax_history.detach().clone()) for s in _delayed_meta_states(m)]
        for m in modules
    }
    try:
        yield
    finally:
        with torch.no_grad():
            for m in modules:
                states = _delayed_meta_states(m)
                before = saved[m]
                if len(before) == len(states):
                    for s, (scale, history) in zip(states, before):
                        s.scale.copy_(scale)
                        s.amax_history.copy_(history)
                elif not before:
                    for s in states:
                        s.scale.fill_(1.0)
                        s.amax_history.zero_()
                else:  # TE rebuilt the module's recipe state inside the body: nothing sane to restore
                    log.warning("FP8 recipe state of %s changed shape during a teacher pass", type(m).__name__)


# ---- weight-cast caches ------------------------------------------------------------------------------------------
def reset_fp8_weight_caches(model: torch.nn.Module) -> int:
    """Make every TE layer re-cast its weights to FP8 on its next forward; returns how many were reset."""
    count = 0
    for module in model.modules():
        if hasattr(module, "is_first_microbatch"):
            module.is_first_microbatch = True
            count += 1
    return count


def scaling_state_equal(a: dict, b: dict, *, history: bool = True) -> Optional[str]:
    """None if two snapshots are equal; else the first module that differs (for reports and checks)."""
    if a.keys() != b.keys():
        return f"modules differ: {sorted(set(a) ^ set(b))[:3]}"
    for name in a:
        for (sa, ha), (sb, hb) in zip(a[name], b[name]):
            if not torch.equal(sa, sb) or (history and not torch.equal(ha, hb)):
                return name
    return None
