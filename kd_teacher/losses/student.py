"""The student's side of the KD loss: log-probs of the teacher's k ids (+ a tail bucket) from vocab-parallel logits.

Megatron's output layer leaves each TP rank with a contiguous shard [vocab_start, vocab_start + V_local) of the
padded vocabulary. Per token we need, at temperature T:

    ls_i    = z[id_i] / T - L        for the k teacher ids      (L  = logsumexp(z / T) over the true vocabulary)
    ls_tail = LT - L                 mass outside the teacher ids (LT = logsumexp(z / T) over the other ids)

One pass over the local shard gives the local max, the logits at the ids this rank owns, and the sum of exps
of the *other* columns (the teacher's ids are set to -inf in the fp32 working copy first). So the tail is a sum
of its own terms, never `1 - sum(q_i)`, which cancels to noise when the tail is small. Across TP ranks: one
MAX all-reduce of the max, then one SUM all-reduce of [gathered logits | rescaled tail sum | bad-row count].
The full-vocabulary normaliser is then L = log(exp(LT) + sum_i exp(z[id_i] / T)): an addition, no cancellation.

Backward (custom, no autograd graph over the vocabulary): with g the gradient of the k+1 bucket log-probs and
G = sum(g), the gradient of the logits is

    at a teacher id j = id_i:   (g_i - G * q_i) / T
    elsewhere (true vocab):     exp(z_j / T - LT) * (g_tail - G * Q_tail) / T
    padding columns:            0

It re-reads the logits (saved by reference, not copied) instead of saving a softmax, so the memory beyond the
logits and their gradient is one working buffer of chunk x V_local (fp32) plus O(tokens x k).
`tail=False` needs only the gathered logits; its gradient touches the k ids alone.

On CUDA the tail's two full-shard passes (forward: max and tail sum; backward: the tail gradient) run as fused
Triton kernels (`kd_teacher.kernels.kd_loss`) that read the logits once per pass and need no fp32 working copy,
so `chunk` does not apply there; the PyTorch code below is the CPU path and the reference they are tested
against. The ids are left out of the kernels' sum exactly as here (a bitmask of the ids, not a subtraction).

Bad rows (NaN, +inf, all -inf) are counted on the device; `student_buckets(check=False)` hands the count back
instead of reading it, so that a caller can fold it into the one host read it makes per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from kd_teacher.kernels.kd_loss import fused_tail_grad, fused_tail_stats


class StudentLogitsError(ValueError):
    """The student logits cannot be used as given (layout, dtype, non-finite values)."""


# ---- layout: tokens as rows of a 2-D view, without copying the logits ----------------------------------------

@dataclass
class TokenRows:
    """The logits as a [tokens, V_local] view and how its token order maps to the [b, s] grid."""

    rows: torch.Tensor
    seq_major: bool  # True: row = s * b + b_i (Megatron's [s, b, V] memory order); False: row = b_i * s + s_i

    def to_rows(self, per_token: torch.Tensor) -> torch.Tensor:
        """[b, s, ...] -> [tokens, ...] in this row order (small tensors only: may copy)."""
        t = per_token.transpose(0, 1) if self.seq_major else per_token
        return t.reshape(self.rows.shape[0], *per_token.shape[2:])

    def to_grid(self, per_row: torch.Tensor, b: int, s: int) -> torch.Tensor:
        """[tokens, ...] in this row order -> [b, s, ...]."""
        if self.seq_major:
            return per_row.reshape(s, b, *per_row.shape[1:]).transpose(0, 1)
        return per_row.reshape(b, s, *per_row.shape[1:])


def token_rows(logits: torch.Tensor) -> TokenRows:
    """View [b, s, V] logits as rows; accepts contiguous [b, s, V] and Megatron's [s, b, V].transpose(0, 1)."""
    if logits.dim() != 3:
        raise StudentLogitsError(f"student logits must be [batch, seq, vocab_shard], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise StudentLogitsError(f"student logits must be a float tensor (fp32/bf16/fp16), got {logits.dtype}")
    b, s, v = logits.shape
    if logits.is_contiguous():
        return TokenRows(logits.view(b * s, v), seq_major=False)
    if logits.transpose(0, 1).is_contiguous():
        return TokenRows(logits.transpose(0, 1).view(s * b, v), seq_major=True)
    # Any other layout would cost a full copy of the logits, which is the one thing this loss must not do.
    raise StudentLogitsError(
        f"student logits with strides {logits.stride()} are neither contiguous [b, s, V] nor a transposed "
        "contiguous [s, b, V]; pass the output layer's tensor (optionally .transpose(0, 1))"
    )


# ---- the vocabulary shard this rank owns ------------------------------------------------------------------

@dataclass(frozen=True)
class VocabShard:
    start: int  # first global id of this rank's columns
    size: int  # V_local (padded)
    valid: int  # columns < true vocab size (the rest are Megatron's padding)
    vocab_size: int  # true vocabulary, all ranks together
    tp: int
    group: Optional[dist.ProcessGroup]

    @classmethod
    def of(cls, v_local: int, vocab_size: int, group) -> "VocabShard":
        tp = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        start = rank * v_local
        return cls(start, v_local, max(0, min(v_local, vocab_size - start)), vocab_size, tp, group)

    def local_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Column positions of global `ids` [N, k] in this shard (0 where not owned) and the owned mask."""
        pos = ids.to(torch.int64) - self.start
        owned = (pos >= 0) & (pos < self.valid)
        return torch.where(owned, pos, torch.zeros_like(pos)), owned


def _chunks(n: int, chunk: Optional[int]):
    step = n if not chunk else max(1, int(chunk))
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # float64 only so that torch.autograd.gradcheck can check the custom backward; everything else is fp32.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ---- forward pieces ---------------------------------------------------------------------------------------

def _shifted_scaled(rows_chunk, shift, inv_t: float, valid: int, out):
    """out[:, :valid] = (z - shift) / T in the compute dtype, padding columns -inf; one pass when T = 1.

    On CUDA `torch.sub(..., out=)` reads the bf16 logits and writes fp32 in one kernel (the cast happens in
    the load), so the upcast and the shift cost one pass. PyTorch's CPU kernels take a much slower path for
    mixed dtypes (~7x a plain copy), so there an upcasting copy and an in-place shift are faster.
    """
    body = out[:, :valid] if valid < out.shape[1] else out
    if out.is_cuda or rows_chunk.dtype == out.dtype:
        torch.sub(rows_chunk[:, :valid], shift.unsqueeze(1), out=body)
    else:
        body.copy_(rows_chunk[:, :valid]).sub_(shift.unsqueeze(1))
    if inv_t != 1.0:
        body.mul_(inv_t)
    if valid < out.shape[1]:
        out[:, valid:] = float("-inf")
    return out


def _remove_ids(x, pos, owned):
    # Adding -inf at the teacher's ids takes them out of every sum that follows; adding 0 at column 0 for ids
    # owned by other ranks is harmless, so one scatter_add serves every row without a branch.
    x.scatter_add_(1, pos, torch.where(owned, float("-inf"), 0.0).to(x.dtype))


def _shard_pass(rows, pos, owned, shard: VocabShard, inv_t: float, tail: bool, chunk):
    """Local max of the raw logits, raw logits at owned ids (0 elsewhere), tail sum of exp((z - max_local) / T)."""
    n, v = rows.shape
    dt = _compute_dtype(rows)
    zero = torch.zeros((), dtype=dt, device=rows.device)
    gathered = torch.where(owned, rows.gather(1, pos).to(dt), zero)
    if shard.valid == 0:
        local_max = torch.full((n,), float("-inf"), dtype=dt, device=rows.device)
        return gathered, local_max, torch.zeros(n, dtype=dt, device=rows.device)
    if tail:
        fused = fused_tail_stats(rows, pos, owned, shard.valid, inv_t)
        if fused is not None:
            return gathered, fused[0], fused[1]
    # max of the stored values is exact in any dtype, so no upcast pass is needed for it.
    local_max = rows[:, : shard.valid].amax(dim=1).to(dt)
    tail_sum = torch.zeros(n, dtype=dt, device=rows.device)
    if not tail:
        return gathered, local_max, tail_sum
    work = None
    for lo, hi in _chunks(n, chunk):
        if work is None or work.shape[0] != hi - lo:
            work = torch.empty(hi - lo, v, dtype=dt, device=rows.device)
        x = _shifted_scaled(rows[lo:hi], _finite_or_zero(local_max[lo:hi]), inv_t, shard.valid, work)
        _remove_ids(x, pos[lo:hi], owned[lo:hi])
        tail_sum[lo:hi] = x.exp_().sum(dim=1)
    return gathered, local_max, tail_sum


def _finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    # A shard (or row) with only padding / -inf has max -inf; shifting by 0 instead keeps exp() at 0, not NaN.
    return torch.where(torch.isneginf(t), torch.zeros_like(t), t)


def _bad_rows(local_max: torch.Tensor) -> torch.Tensor:
    # amax propagates NaN, so a NaN anywhere in a row shows up in its max; +inf makes every exp() NaN.
    return torch.isnan(local_max) | torch.isposinf(local_max)


@dataclass
class CEStats:
    """The cross-entropy's per-row numbers of one shard, beside the KD term's (`kd_teacher.losses.ce_kd`):
    before `_reduce_over_tp` local, after it global (every rank the same)."""

    max_all: torch.Tensor  # max over every column, padding included (Megatron's CE includes it)
    sum_all: torch.Tensor  # sum of exp(z - max_all) over every column
    target: torch.Tensor  # the label's raw logit where this shard owns it, else 0 (after: the owner's)
    owned: torch.Tensor  # 1 where this shard owns the label, else 0 (after: 1 where any shard does)


def _reduce_over_tp(gathered, local_max, tail_sum, shard: VocabShard, inv_t: float, ce: Optional[CEStats] = None):
    """Global max, gathered logits and tail sum (relative to the global max) on every rank; bad-row count
    (a 0-d int64 tensor, not read here: reading it would stall the host until the GPU catches up); and, given
    `ce`, the CE's global numbers, in the same two collectives (one MAX, one SUM), as Megatron's own CE does."""
    bad = _bad_rows(local_max)
    if shard.tp == 1:
        return gathered, local_max, tail_sum, bad.sum() + torch.isneginf(local_max).sum(), ce
    global_max = torch.where(bad, torch.full_like(local_max, float("inf")), local_max)
    maxes = global_max.unsqueeze(0) if ce is None else torch.stack([global_max, ce.max_all.to(global_max.dtype)])
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=shard.group)
    global_max = maxes[0]
    scale = torch.exp((_finite_or_zero(local_max) - _finite_or_zero(global_max)) * inv_t)
    scale = torch.where(torch.isneginf(local_max) | bad, torch.zeros_like(scale), scale)
    # The bad-row count travels in the SUM reduction, so every rank knows and all raise together instead of
    # some of them waiting in the next collective.
    columns = [gathered, (tail_sum * scale).unsqueeze(1), bad.to(gathered.dtype).unsqueeze(1)]
    if ce is not None:
        max_all = maxes[1]
        scale_all = torch.exp(_finite_or_zero(ce.max_all) - _finite_or_zero(max_all))
        scale_all = torch.where(torch.isneginf(ce.max_all), torch.zeros_like(scale_all), scale_all)
        columns += [(ce.sum_all * scale_all).unsqueeze(1), ce.target.unsqueeze(1), ce.owned.unsqueeze(1)]
    packed = torch.cat([c.to(gathered.dtype) for c in columns], 1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=shard.group)
    k = gathered.shape[1]
    n_bad = packed[:, k + 1].sum().round().to(torch.int64) + torch.isneginf(global_max).sum()
    if ce is not None:
        ce = CEStats(maxes[1], packed[:, k + 2], packed[:, k + 3], packed[:, k + 4])
    return packed[:, :k], global_max, packed[:, k], n_bad, ce


def _kd_buckets(gathered, gmax, tail_sum, inv_t: float, k: int, vocab_size: int):
    """Student bucket log-probs [N, k+1] (the k ids, then the tail) and the tail's log-sum, from global numbers."""
    if k < vocab_size:
        # Some vocabulary lies outside the ids, so the tail is not empty even when its exps underflow
        # (a student > 87 T nats sure of its top ids): a floor at the smallest normal keeps the loss finite.
        tail_sum = tail_sum.clamp(min=torch.finfo(tail_sum.dtype).tiny)
    # Everything relative to the global max m: a_i = (z_i - m) / T <= 0, so the exps cannot overflow.
    buckets = torch.cat([(gathered - gmax.unsqueeze(1)) * inv_t, torch.log(tail_sum).unsqueeze(1)], 1)
    return buckets - torch.logsumexp(buckets, dim=1, keepdim=True), buckets[:, -1].clone()


def _kd_backward_terms(grad_logp, logp, gmax, log_tail, owned, inv_t: float):
    """The KD buckets' gradient split as the logits' gradient needs it: `at_ids` [N, k] (0 where not owned), the
    tail's per-row factor `elsewhere` [N, 1] and `shift` [N], so that a non-id column's gradient is
    exp((z - shift) / T) * elsewhere."""
    k = owned.shape[1]
    total = grad_logp.sum(dim=1, keepdim=True)
    q = logp.exp()
    at_ids = torch.where(owned, (grad_logp[:, :k] - total * q[:, :k]) * inv_t, torch.zeros_like(q[:, :k]))
    elsewhere = ((grad_logp[:, k] - total[:, 0] * q[:, k]) * inv_t).unsqueeze(1)
    # (z - shift) / T = z / T - LT; a row without tail mass gets shift +inf, so its tail gradient is 0.
    shift = gmax + torch.where(torch.isneginf(log_tail), float("inf"), log_tail / inv_t)
    return at_ids, elsewhere, shift


def raise_on_bad_rows(n_bad: int) -> None:
    if n_bad:
        raise StudentLogitsError(f"student logits are NaN, +inf or all -inf in {n_bad} token(s): the loss would be NaN")


class _VocabParallelBuckets(torch.autograd.Function):
    """rows [N, V_local] -> (bucket log-probs [N, k+1] or logits/T at the ids [N, k]; then, without gradient,
    the global max [N], the raw logits at the ids [N, k] and the bad-row count, 0-d int64).

    Bad rows give NaN outputs rather than an error here: the caller reads the count and raises before the
    loss is used (see `student_buckets`)."""

    @staticmethod
    def forward(ctx, rows, pos, owned, shard: VocabShard, temperature: float, tail: bool, chunk):
        inv_t = 1.0 / temperature
        gathered, local_max, tail_sum = _shard_pass(rows, pos, owned, shard, inv_t, tail, chunk)
        gathered, gmax, tail_sum, bad, _ = _reduce_over_tp(gathered, local_max, tail_sum, shard, inv_t)
        ctx.shard, ctx.inv_t, ctx.tail, ctx.chunk, ctx.logits_dtype = shard, inv_t, tail, chunk, rows.dtype
        ctx.mark_non_differentiable(gmax, gathered, bad)
        if not tail:
            ctx.save_for_backward(pos, owned)
            return gathered * inv_t, gmax, gathered, bad
        logp, log_tail = _kd_buckets(gathered, gmax, tail_sum, inv_t, pos.shape[1], shard.vocab_size)
        ctx.save_for_backward(rows, pos, owned, gmax, log_tail, logp)
        return logp, gmax, gathered, bad

    @staticmethod
    def backward(ctx, grad_logp, _grad_max, _grad_gathered, _grad_bad):
        shard, inv_t = ctx.shard, ctx.inv_t
        if not ctx.tail:
            pos, owned = ctx.saved_tensors
            return _sparse_grad(grad_logp * inv_t, pos, owned, shard.size, ctx.logits_dtype) + (None,) * 6
        rows, pos, owned, gmax, log_tail, logp = ctx.saved_tensors
        at_ids, elsewhere, shift = _kd_backward_terms(grad_logp, logp, gmax, log_tail, owned, inv_t)
        grad = fused_tail_grad(rows, pos, owned, shard.valid, inv_t, shift, elsewhere)
        if grad is None:
            grad = _tail_grad(rows, pos, owned, shard, inv_t, shift, elsewhere, ctx.chunk, logp.dtype)
        # The tail gradient is 0 at the ids (they were -inf): adding theirs there completes it.
        grad.scatter_add_(1, pos, at_ids.to(grad.dtype))
        return (grad,) + (None,) * 6


def _tail_grad(rows, pos, owned, shard: VocabShard, inv_t: float, shift, elsewhere, chunk, dt):
    """exp((z - shift) / T) * elsewhere at valid non-id columns, 0 at the ids and padding, in the logits' dtype."""
    grad = torch.empty_like(rows)
    in_place = rows.dtype == dt  # fp32 logits: work in the gradient itself, no extra buffer
    work = None
    for lo, hi in _chunks(rows.shape[0], chunk):
        if in_place:
            x = grad[lo:hi]
        else:
            if work is None or work.shape[0] != hi - lo:
                work = torch.empty(hi - lo, rows.shape[1], dtype=dt, device=rows.device)
            x = work
        _shifted_scaled(rows[lo:hi], shift[lo:hi], inv_t, shard.valid, x)
        _remove_ids(x, pos[lo:hi], owned[lo:hi])
        x.exp_()
        out = grad[lo:hi]
        if out.is_cuda or in_place:
            torch.mul(x, elsewhere[lo:hi], out=out)  # writes the logits dtype directly
        else:  # CPU: mixed-dtype kernels are slow, see _shifted_scaled
            out.copy_(x.mul_(elsewhere[lo:hi]))
    return grad


def _sparse_grad(grad_ids, pos, owned, v_local, dtype):
    # Allocated in the logits' dtype: an fp32 gradient would be cast by autograd, costing a second full copy.
    grad = torch.zeros(pos.shape[0], v_local, dtype=dtype, device=grad_ids.device)
    grad.scatter_add_(1, pos, torch.where(owned, grad_ids, torch.zeros_like(grad_ids)).to(dtype))
    return (grad,)


@dataclass
class StudentBuckets:
    """Per token row: `logp` [N, k+1] bucket log-probs (tail=True) or logits/T at the ids [N, k] (tail=False),
    then, without gradient, `max_logit` [N], the raw global max over the true vocabulary, and `logits_at_ids`
    [N, k], the raw logits at the ids (their comparison tells whether the student's argmax is a teacher id);
    `bad_rows`: 0-d int64 count of rows with NaN, +inf or only -inf logits (the same on every TP rank)."""

    logp: torch.Tensor
    max_logit: torch.Tensor
    logits_at_ids: torch.Tensor
    bad_rows: torch.Tensor


def student_buckets(
    rows: torch.Tensor, ids: torch.Tensor, *, vocab_size: int, temperature: float, tail: bool,
    group=None, chunk_tokens: Optional[int] = None, check: bool = True,
) -> StudentBuckets:
    """Student bucket log-probs for the teacher's global `ids` [N, k] from this rank's shard `rows` [N, V_local].

    check=True raises StudentLogitsError on bad rows (one host read); check=False leaves `bad_rows` to the
    caller, who must pass it to `raise_on_bad_rows` before using the outputs.
    """
    shard = VocabShard.of(rows.shape[1], vocab_size, group)
    pos, owned = shard.local_ids(ids)
    logp, gmax, at_ids, bad = _VocabParallelBuckets.apply(rows, pos, owned, shard, float(temperature), bool(tail),
                                                          chunk_tokens)
    if check:
        raise_on_bad_rows(int(bad))
    return StudentBuckets(logp, gmax, at_ids, bad)
