"""The student's cross-entropy and the KD term's student side from one pass over the logits: `fused_ce_kd`.

Megatron's CE and the KD loss each read the whole [tokens, V/TP] logits in the forward and each write a full
gradient in the backward, which autograd then adds: three passes and a sum over the largest tensor of the
step. Both need the same numbers -- the row max and sums of exponentials -- so one pass serves both:

forward   per row and shard: max and sum of exp(z - max) over every column (the CE's: Megatron's CE includes
          the vocabulary padding), max over the true vocabulary and tail sum of exp((z - max) / T) over the
          non-id columns (the KD term's), the label's logit and the logits at the teacher ids; then the same
          two collectives as before over the TP group (one MAX, one SUM), now carrying the CE's numbers too.
          CE = log(sum) - (z_label - max), exactly Megatron's formula (`vocab_parallel_cross_entropy`),
          including its answer for a label no rank owns (the predicted logit counts 0).
backward  one gradient, in fp32, rounded once to the logits' dtype:
          ce_grad * softmax(z) - ce_grad at the label + the KD tail's exp((z - shift) / T) * factor, and at the
          teacher ids their KD gradient plus the CE's, added from [N, k] values.

Triton kernels where they apply (`kd_teacher.kernels.ce_kd`); this module's PyTorch path is the reference.
The CE equals Megatron's to fp32 rounding of the sum of exponentials (not bitwise: the sum runs in another
order; docs/kd_step.md states the tolerance), and the KD outputs are those of `student_buckets`.
"""

from __future__ import annotations

from typing import Optional

import torch

from kd_teacher.kernels.ce_kd import fused_ce_kd_grad, fused_ce_kd_stats
from kd_teacher.losses.student import (
    CEStats,
    StudentBuckets,
    VocabShard,
    _chunks,
    _compute_dtype,
    _finite_or_zero,
    _kd_backward_terms,
    _kd_buckets,
    _reduce_over_tp,
    _shard_pass,
    _shifted_scaled,
)


def _label_columns(labels: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The label's column in this shard, -1 where another shard owns it (Megatron's CE: the whole padded shard)."""
    col = labels.to(torch.int64) - shard.start
    return torch.where((col >= 0) & (col < shard.size), col, torch.full_like(col, -1))


def _stats_reference(rows, pos, owned, shard: VocabShard, inv_t: float, chunk):
    """The PyTorch path of `fused_ce_kd_stats`: (max_all, sum_all, max_valid, tail_sum) per row."""
    _, max_valid, tail_sum = _shard_pass(rows, pos, owned, shard, inv_t, True, chunk)
    dt = _compute_dtype(rows)
    max_all = rows.amax(dim=1).to(dt)
    sum_all = torch.empty_like(max_all)
    for lo, hi in _chunks(rows.shape[0], chunk):
        shift = _finite_or_zero(max_all[lo:hi]).unsqueeze(1)
        sum_all[lo:hi] = torch.exp(rows[lo:hi].to(dt) - shift).sum(dim=1)
    return max_all, sum_all, max_valid, tail_sum


def _grad_reference(rows, pos, owned, shard: VocabShard, inv_t: float, label_col, ce_grad, ce_shift, kd_shift,
                    kd_scale, chunk, dt):
    """The PyTorch path of `fused_ce_kd_grad`: the gradient in the logits' dtype, 0 at the owned ids."""
    grad = torch.empty_like(rows)
    for lo, hi in _chunks(rows.shape[0], chunk):
        g = torch.exp(rows[lo:hi].to(dt) - ce_shift[lo:hi].unsqueeze(1)) * ce_grad[lo:hi].unsqueeze(1)
        if kd_shift is not None:
            x = _shifted_scaled(rows[lo:hi], kd_shift[lo:hi], inv_t, shard.valid,
                                torch.empty(hi - lo, rows.shape[1], dtype=dt, device=rows.device))
            g += x.exp_() * kd_scale[lo:hi]
        col = label_col[lo:hi]
        g.scatter_add_(1, col.clamp(min=0).unsqueeze(1), torch.where(col >= 0, -ce_grad[lo:hi], 0.0).unsqueeze(1))
        # 0 at the owned ids (counted, not scattered: ids owned elsewhere sit at column 0 with owned False)
        at_ids = torch.zeros(g.shape, dtype=torch.int32, device=g.device).scatter_add_(
            1, pos[lo:hi], owned[lo:hi].to(torch.int32))
        grad[lo:hi] = g.masked_fill_(at_ids > 0, 0.0)
    return grad


class _FusedCrossEntropyKD(torch.autograd.Function):
    """rows [N, V_local], labels [N] -> (CE [N]; KD bucket log-probs [N, k+1] (tail) or logits/T at the ids
    [N, k]; then without gradient: the global max over the true vocabulary [N], the raw logits at the ids [N, k],
    the bad-row count, 0-d int64). Bad rows give NaN outputs here; the caller raises on the count."""

    @staticmethod
    def forward(ctx, rows, labels, pos, owned, shard: VocabShard, temperature: float, tail: bool, chunk):
        inv_t = 1.0 / temperature
        dt = _compute_dtype(rows)
        stats = fused_ce_kd_stats(rows, pos, owned, shard.valid, inv_t)
        if stats is None:
            stats = _stats_reference(rows, pos, owned, shard, inv_t, chunk)
        max_all, sum_all, max_valid, tail_sum = stats
        label_col = _label_columns(labels, shard)
        has_label = label_col >= 0
        zero = torch.zeros((), dtype=dt, device=rows.device)
        target = torch.where(has_label, rows.gather(1, label_col.clamp(min=0).unsqueeze(1)).squeeze(1).to(dt), zero)
        gathered = torch.where(owned, rows.gather(1, pos).to(dt), zero)
        ce_local = CEStats(max_all, sum_all, target, has_label.to(dt))
        gathered, gmax, tail_sum, bad, ce = _reduce_over_tp(gathered, max_valid, tail_sum, shard, inv_t, ce_local)
        # Megatron: loss = log(sum_exp) - (z_label - max), the predicted logit 0 where no rank owns the label.
        log_sum = torch.log(ce.sum_all)
        loss = log_sum - torch.where(ce.owned > 0, ce.target - ce.max_all, zero)
        ce_shift = ce.max_all + log_sum
        # A row without a finite normaliser (all -inf: a bad row, refused by the caller) gets no CE gradient.
        ce_shift = torch.where(torch.isfinite(ce_shift), ce_shift, torch.full_like(ce_shift, float("inf")))
        ctx.shard, ctx.inv_t, ctx.tail, ctx.chunk = shard, inv_t, tail, chunk
        ctx.mark_non_differentiable(gmax, gathered, bad)
        if tail:
            kd_out, log_tail = _kd_buckets(gathered, gmax, tail_sum, inv_t, pos.shape[1], shard.vocab_size)
            ctx.save_for_backward(rows, pos, owned, label_col, ce_shift, gmax, log_tail, kd_out)
        else:
            kd_out = gathered * inv_t
            ctx.save_for_backward(rows, pos, owned, label_col, ce_shift)
        return loss, kd_out, gmax, gathered, bad

    @staticmethod
    def backward(ctx, grad_ce, grad_kd, _grad_max, _grad_gathered, _grad_bad):
        shard, inv_t = ctx.shard, ctx.inv_t
        rows, pos, owned, label_col, ce_shift = ctx.saved_tensors[:5]
        dt = ce_shift.dtype
        if ctx.tail:
            gmax, log_tail, logp = ctx.saved_tensors[5:]
            at_ids, kd_scale, kd_shift = _kd_backward_terms(grad_kd, logp, gmax, log_tail, owned, inv_t)
        else:
            at_ids = torch.where(owned, grad_kd * inv_t, torch.zeros_like(grad_kd))
            kd_scale = kd_shift = None
        grad_ce = grad_ce.to(dt)
        # At the ids, the CE's softmax and label terms join the KD's, summed here and rounded once below.
        z_ids = rows.gather(1, pos).to(dt)
        is_label = (pos == label_col.unsqueeze(1)).to(dt)
        ce_at_ids = grad_ce.unsqueeze(1) * (torch.exp(z_ids - ce_shift.unsqueeze(1)) - is_label)
        at_ids = torch.where(owned, at_ids + ce_at_ids, torch.zeros_like(at_ids))
        grad = fused_ce_kd_grad(rows, pos, owned, shard.valid, inv_t, label_col, grad_ce, ce_shift, kd_shift, kd_scale)
        if grad is None:
            grad = _grad_reference(rows, pos, owned, shard, inv_t, label_col, grad_ce, ce_shift, kd_shift, kd_scale,
                                   ctx.chunk, dt)
        grad.scatter_add_(1, pos, at_ids.to(grad.dtype))
        return (grad,) + (None,) * 7


def fused_ce_kd(rows: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, *, vocab_size: int, temperature: float,
                tail: bool, group=None, chunk_tokens: Optional[int] = None) -> tuple[torch.Tensor, StudentBuckets]:
    """Per-row cross-entropy [N] (fp32) of `labels` [N] (global ids) and the KD term's `StudentBuckets` for the
    teacher's global `ids` [N, k], from this rank's shard `rows` [N, V_local] of the logits, in one pass.

    The CE is Megatron-Core's `vocab_parallel_cross_entropy` of the same rows (see the module docstring); the
    buckets are `student_buckets(rows, ids, ..., check=False)`'s: the caller must pass `bad_rows` to
    `raise_on_bad_rows` before either output is used.
    """
    shard = VocabShard.of(rows.shape[1], vocab_size, group)
    pos, owned = shard.local_ids(ids)
    ce, kd_out, gmax, at_ids, bad = _FusedCrossEntropyKD.apply(rows, labels, pos, owned, shard, float(temperature),
                                                               bool(tail), chunk_tokens)
    return ce, StudentBuckets(kd_out, gmax, at_ids, bad)


__all__ = ["fused_ce_kd"]
