"""Top-k at the output layer: teacher mode never makes GPTModel's [b, s, V] copy of the logits.

GPTModel's forward ends with `logits.transpose(0, 1).contiguous()`: a full copy of the logits shard,
[s, b, V/TP] -> [b, s, V/TP]. For 8192 tokens of a 128k vocabulary that is 2.1 GB read and 2.1 GB written,
~1.4 ms of HBM traffic on an H100, as much as the top-k kernel itself. Teacher mode only needs each row's top-k
and log-sum-exp, which do not depend on the order of the rows. So a forward hook on the output layer runs the
extraction on the [s, b, V/TP] logits the output layer returns and hands the rest of GPTModel's forward an
empty [s, b, 0] tensor in their place: the transpose then copies nothing, and the logits are freed as soon as
the extraction has read them. The logits themselves come from the same output layer, kernels and inputs, so
the numbers are the training forward's.

That holds only while nothing between the output layer and the end of the forward changes the logits. GPTModel
code we have read (megatron-core 0.16, 0.19) does nothing to them there except MuP output scaling (0.19,
`use_mup`), multi-token prediction (`mtp_num_layers`) and the config logger, so those turn the tap off, as does
a subclass with its own `_postprocess`. Against versions we have not read, the engine checks the tap once, on
its first forward, against the untapped forward of the same tokens, and keeps it only if the two agree bit for
bit (`TeacherEngine._first_forward_checked`).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)


def _gpt_model_class():
    from megatron.core.models.gpt import GPTModel

    return GPTModel


def why_not_tapped(gpt: torch.nn.Module) -> Optional[str]:
    """None when the output-layer tap is sound for this GPTModel; otherwise the reason it is not."""
    gpt_cls = _gpt_model_class()
    cfg = gpt.config
    if getattr(type(gpt), "_postprocess", None) is not getattr(gpt_cls, "_postprocess", None):
        return f"{type(gpt).__name__} overrides GPTModel._postprocess"
    if getattr(cfg, "mtp_num_layers", None):
        return "multi-token prediction calls the output layer more than once"
    if getattr(cfg, "use_mup", False):
        return "MuP scales the logits after the output layer"
    if getattr(cfg, "config_logger_dir", ""):
        return "the config logger records the logits after the output layer"
    if gpt.post_process and getattr(gpt, "output_layer", None) is None:
        return "the last stage has no output_layer"
    return None


class OutputLayerTap:
    """Runs `extract` on the output layer's logits inside the model's forward (see the module docstring)."""

    def __init__(self, gpt: torch.nn.Module):
        # Off the last pipeline stage there is no output layer: the forward runs as it is.
        self.output_layer = gpt.output_layer if gpt.post_process else None

    @classmethod
    def for_model(cls, model_modules: list) -> Optional["OutputLayerTap"]:
        """A tap for the one GPTModel among the teacher's modules, or None (logged) where it is not sound."""
        gpts = [m for m in model_modules if isinstance(m, _gpt_model_class())]
        if len(gpts) != 1:
            reason = f"expected one GPTModel in the teacher, found {len(gpts)}"
        else:
            reason = why_not_tapped(gpts[0])
        if reason is not None:
            log.info("teacher mode extracts from the model's returned logits: %s", reason)
            return None
        return cls(gpts[0])

    def run(self, forward: Callable[[], object], extract: Callable[[torch.Tensor], tuple]) -> Optional[tuple]:
        """forward() runs the model once; returns `extract(logits [s, b, V/TP])` with every tensor transposed to
        [b, s, ...] (views), or None off the last stage."""
        if self.output_layer is None:
            forward()
            return None
        captured = {}

        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            captured["result"] = extract(logits)
            empty = logits.new_empty((logits.shape[0], logits.shape[1], 0))
            return (empty,) + tuple(output[1:]) if isinstance(output, tuple) else empty

        handle = self.output_layer.register_forward_hook(hook)
        try:
            forward()
        finally:
            handle.remove()
        if "result" not in captured:
            raise RuntimeError("the teacher's forward never called its output layer on the last pipeline stage")
        return tuple(t.transpose(0, 1) for t in captured["result"])
