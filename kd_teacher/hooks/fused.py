"""What keeps the KD step cheap on a GPU student: the fused CE + KD pass, and checks that never hold the host.

`FusedCrossEntropy`: for one forward_step call, the student model's `compute_language_model_loss` (where a
`model(..., labels=labels)` forward computes Megatron's CE from the output layer's logits) is served by
`kd_teacher.losses.ce_kd.fused_ce_kd`, which computes the CE and the KD term's student side in one pass over
the logits and writes one gradient. It returns the same per-token CE [b, s] as Megatron's, so the user's
forward_step and loss_func run unchanged; the hook's loss then takes the KD side from it instead of reading
the logits again. It needs the micro-batch's payload before the model runs: the hook gets it when the user's
forward_step draws the micro-batch. Anything it does not serve (another call, logits it did not capture, no
payload) goes to the model's own method.

`DeferredChecks`: the KD loss's value checks (payload values, ids, lse; the student's bad rows) are computed on
the device; reading them at once would stall the host until the GPU caught up, once per micro-batch. They are
copied to the host behind the queued work and read at the end of that micro-batch's backward pass (before its
gradient can reach an optimizer step), or, where no backward runs (evaluation), at the next micro-batch or
when the hook closes; in training, the next micro-batch reads those already copied without waiting (a
pipeline schedule runs several forwards before the first backward). A failed check raises there, naming the
micro-batch.
"""

from __future__ import annotations

import collections
from typing import Callable, Optional

import torch

from kd_teacher.losses.ce_kd import fused_ce_kd
from kd_teacher.losses.kd import raise_on_checks
from kd_teacher.losses.student import StudentBuckets, token_rows
from kd_teacher.payload import PayloadError, TopKPayload


def fused_ce_unsupported(model, cfg) -> Optional[str]:
    """Why the fused CE + KD pass cannot serve this student and KD config (None: it can)."""
    from megatron.core.utils import get_attr_wrapped_model

    if not cfg.fused_ce:
        return "kd.fused_ce is false"
    if cfg.alpha == 0.0:
        return "alpha = 0 keeps the student's own CE (its trajectory stays bitwise the CE-only one)"
    try:
        gpt = get_attr_wrapped_model(model, "compute_language_model_loss", return_model_obj=True)
    except RuntimeError:
        return "the model has no compute_language_model_loss (not a Megatron-Core GPTModel)"
    if getattr(gpt.config, "mtp_num_layers", None):
        return "multi-token prediction heads call the loss more than once per forward"
    return None


class FusedCrossEntropy:
    """Megatron's `compute_language_model_loss` served by the fused pass for one forward_step call."""

    def __init__(self, model, cfg, vocab_size: int, group, captured: Callable[[], Optional[torch.Tensor]]):
        from megatron.core.utils import get_attr_wrapped_model

        self.gpt = get_attr_wrapped_model(model, "compute_language_model_loss", return_model_obj=True)
        self.cfg, self.vocab_size, self.group, self.captured = cfg, vocab_size, group, captured
        self.payload: Optional[TopKPayload] = None  # set when forward_step draws the micro-batch
        self.student: Optional[StudentBuckets] = None  # the KD side, once the fused pass ran

    def __enter__(self):
        self._own = self.gpt.__dict__.get("compute_language_model_loss")  # a wrapper set on the instance
        self.gpt.compute_language_model_loss = self
        return self

    def __exit__(self, *exc):
        if self._own is None:
            del self.gpt.compute_language_model_loss
        else:
            self.gpt.compute_language_model_loss = self._own
        return False

    def _model_loss(self, labels, logits, *args, **kwargs):
        method = self._own or type(self.gpt).compute_language_model_loss.__get__(self.gpt)
        return method(labels, logits, *args, **kwargs)

    def __call__(self, labels, logits, *args, **kwargs):
        payload = self.payload
        serves = (payload is not None and self.student is None and not args and not kwargs
                  and logits is self.captured() and isinstance(labels, torch.Tensor) and logits.dim() == 3
                  and tuple(labels.shape) == (logits.shape[1], logits.shape[0])
                  and (payload.header.batch, payload.header.seq_len) == tuple(labels.shape))
        if not serves:
            return self._model_loss(labels, logits, *args, **kwargs)
        rows = token_rows(logits.transpose(0, 1))  # Megatron's [s, b, V/TP] as [b, s] rows: a view
        b, s = labels.shape
        with torch.profiler.record_function("kd_teacher.fused_ce_kd"):
            ce, self.student = fused_ce_kd(
                rows.rows, rows.to_rows(labels), rows.to_rows(payload.indices.to(logits.device)),
                vocab_size=payload.header.vocab_size, temperature=payload.header.temperature, tail=self.cfg.tail,
                group=self.group, chunk_tokens=self.cfg.chunk_tokens)
        # Megatron returns the per-token loss as a contiguous [b, s] tensor.
        return rows.to_grid(ce, b, s).contiguous()


class DeferredChecks:
    """Device-side check results of micro-batches, read on the host without making it wait for the GPU."""

    def __init__(self):
        self.pending: collections.deque = collections.deque()  # (values, ready event or None, payload, what)
        self._callback_queued = False

    def add(self, checks: torch.Tensor, payload: TopKPayload, what: str, loss: torch.Tensor) -> None:
        """Read `checks` (see `KDTerms.checks`) at the end of the backward pass through `loss`, or at `run`."""
        if checks.is_cuda:
            host = torch.empty(checks.shape, dtype=checks.dtype, pin_memory=True)
            host.copy_(checks, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host, ready = checks, None
        self.pending.append((host, ready, payload, what))
        if loss.requires_grad:
            loss.register_hook(self._on_backward)

    def _on_backward(self, grad):
        # A tensor hook runs as the backward reaches the KD loss; the queued callback once that backward pass
        # has launched all its work (the GPU keeps running it while the host reads the small copy).
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)
        return grad

    def _after_backward(self) -> None:
        self._callback_queued = False
        self.run()

    def run(self, wait: bool = True) -> None:
        """Read the pending checks in order and raise on the first that failed; each read waits for its own copy
        alone, or, with wait=False, the reads stop at the first copy not done yet (the others stay pending)."""
        while self.pending:
            host, ready, payload, what = self.pending[0]
            if ready is not None and not wait and not ready.query():
                return
            self.pending.popleft()
            if ready is not None:
                ready.synchronize()
            try:
                raise_on_checks(payload, host.tolist())
            except (PayloadError, ValueError) as e:
                self.pending.clear()
                raise type(e)(f"{what}: {e}") from e
