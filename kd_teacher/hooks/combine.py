"""The wrapped loss: the user's loss (cross-entropy) mixed with the KD term in Megatron's loss contract.

Megatron-Core's schedules accept two loss-function results, and the mix keeps whichever the user's
function returns:
- `(loss_sum, num_tokens, report)`: sums over the micro-batch's unmasked tokens; the schedule divides by
  the token count. KD is summed over the same `loss_mask`, so `alpha * KD_sum + (1 - alpha) * CE_sum`.
- `(loss, report)` (legacy): a per-token mean; KD enters as its masked mean.

Report entries follow the same convention as Megatron-LM's: `[sum, count]` pairs in the first case (the
training loop divides after summing micro-batches and data-parallel ranks), plain means in the second.
"""

from __future__ import annotations

from typing import Optional

import torch

from kd_teacher.hooks.config import KDConfig
from kd_teacher.payload import TopKPayload


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _queued_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without holding the host: a data loader's host tensor (Megatron-LM's loss_mask) is copied
    through page-locked memory behind the queued work, where a plain `.to(device)` would wait for all of it."""
    if t.device == device or device.type != "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def kd_terms_for(logits_sbv: torch.Tensor, payload: TopKPayload, mask: torch.Tensor, cfg: KDConfig,
                 vocab_size: Optional[int], student=None, defer_checks: bool = False):
    """Per-token KD loss and statistics (`kd_teacher.losses.KDTerms`) from the output layer's [s, b, V/TP]
    (`student`: the student's side already computed by the fused CE + KD pass)."""
    from kd_teacher.losses import kd_terms

    return kd_terms(
        logits_sbv.transpose(0, 1),  # [b, s, V/TP] as a view: no copy of the logits
        payload, kind=cfg.kind, temperature=cfg.temperature, tail=cfg.tail, beta=cfg.beta, loss_mask=mask,
        group=_tp_group(), vocab_size=vocab_size, chunk_tokens=cfg.chunk_tokens, student=student,
        defer_checks=defer_checks,
    )


def combine_losses(outputs: tuple, logits_sbv: torch.Tensor, payload: TopKPayload,
                   loss_mask: Optional[torch.Tensor], cfg: KDConfig, vocab_size: Optional[int] = None,
                   student=None, deferred=None, what: str = "KD micro-batch") -> tuple:
    """Mix the user's loss-function result with KD; returns the same contract shape with KD metrics added.

    student: the KD side from the fused CE + KD pass (`kd_teacher.hooks.fused`), or None to compute it here.
    deferred: a `DeferredChecks` to hand the loss's value checks to (read later, named `what`), or None to
    read them here.

    KD metrics are averages over the loss tokens (the loss mask's), where tokens without a teacher payload
    (sequences an offline dump lacks) count 0; `kd teacher coverage` is the fraction that had one. So a
    micro-batch, a step or an evaluation without any covered token reports 0 with coverage 0, never 0/0.
    """
    b, s = payload.header.batch, payload.header.seq_len
    device = logits_sbv.device
    loss_tokens = (torch.ones(b, s, device=device) if loss_mask is None
                   else _queued_copy(loss_mask, device).to(torch.float32).reshape(b, s))
    mask = loss_tokens
    present = payload.present
    if present is not None:
        # Sequences an offline dump lacks (kd.offline.missing: ce_only, and evaluation) carry a placeholder
        # payload: they get no KD term, only the (1 - alpha)-weighted cross-entropy of the user's loss.
        mask = loss_tokens * present.to(device=device, dtype=loss_tokens.dtype).reshape(b, 1)
    terms = kd_terms_for(logits_sbv, payload.to(device), mask, cfg, vocab_size, student, deferred is not None)
    if deferred is not None:
        deferred.add(terms.checks, payload, what, terms.loss)
    kd_sum = terms.loss.sum()  # already weighted by the mask
    with torch.no_grad():
        n = loss_tokens.sum()
        metrics = {
            "top1 agreement": (terms.top1_agrees.float() * mask).sum(),
            "teacher tail mass": (terms.teacher_tail.float() * mask).sum(),
        }
        if terms.student_tail is not None:
            metrics["student tail mass"] = (terms.student_tail.float() * mask).sum()
        metrics["teacher coverage"] = mask.sum()
    a = cfg.alpha
    p = cfg.report_prefix
    if len(outputs) == 3:
        ce_sum, num_tokens, report = outputs
        total = a * kd_sum + (1.0 - a) * ce_sum
        report = dict(report or {})
        report[f"{p} loss"] = torch.stack([kd_sum.detach().clone(), n])
        report[f"{p} total loss"] = torch.stack([total.detach().clone().float(),
                                                 torch.as_tensor(num_tokens, device=device).float().reshape(())])
        for name, value in metrics.items():
            report[f"{p} {name}"] = torch.stack([value, n])
        return total, num_tokens, report
    if len(outputs) == 2:
        ce_mean, report = outputs
        n = n.clamp(min=1)
        kd_mean = kd_sum / n
        total = a * kd_mean + (1.0 - a) * ce_mean
        report = dict(report or {})
        report[f"{p} loss"] = kd_mean.detach().clone()
        report[f"{p} total loss"] = total.detach().clone()
        for name, value in metrics.items():
            report[f"{p} {name}"] = value / n
        return total, report
    raise ValueError(f"the wrapped loss function returned {len(outputs)} values; Megatron expects 2 or 3")
