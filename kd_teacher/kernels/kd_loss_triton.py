"""Triton kernels for the student side of the KD loss (`kd_teacher.losses.student`), one vocabulary shard.

The PyTorch path upcasts the logits into an fp32 working copy, sets the teacher's ids to -inf, exponentiates
and sums (and again, plus a multiply and a cast, in the backward): ~40 bytes moved per logit. These kernels
read each logit once per pass and keep everything else in registers. Three launches, in data-flow order (the
launcher is `kd_teacher.kernels.kd_loss`):

1. `id_mask_kernel`: the teacher ids this shard owns, as a per-row bitmask [N, ceil(V_local / 32)] int32
   (one `atomic_or` per id; duplicated ids just set the same bit). 1/64 of the bytes of bf16 logits.
2. `tail_stats_kernel`, one program per row: the row's max of the raw logits over the valid columns (ids
   included, NaN propagated, as `amax` gives it) and the tail sum of exp((z - max) / T) over the valid
   columns that are not teacher ids. The ids are *left out* of the sum, never subtracted from a total: the
   tail can be many orders of magnitude below the total, and a difference would cancel to noise. The sum is
   online: each block of columns is summed against the running max and the running sum is rescaled when
   the max grows; every term is a term of the tail, so rescaling loses nothing to cancellation.
3. `tail_grad_kernel`, one program per (row, block): the tail part of the logits' gradient,
   exp((z - shift) / T) * scale at valid non-id columns, 0 at padding and at the ids, computed in fp32 and
   stored in the logits' dtype. The ids' own gradient is added afterwards by a scatter of [N, k] values.

Columns are laid out as [WORDS, 32] tiles, so that a tile's bitmask is WORDS words loaded once and each
column's bit is `word >> lane & 1`: no gather, and the logits' loads stay contiguous (vectorised).
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # precise expf (CUDA's own algorithm, as torch.exp); the CPU interpreter has no libdevice
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old Triton
    libdevice = None


@triton.jit
def _exp(x, PRECISE_EXP: tl.constexpr):
    if PRECISE_EXP:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _max_nan(a, b):
    # torch.amax propagates NaN, and the loss relies on it to flag a bad row; tl.max would drop it.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def id_mask_kernel(cols_ptr, mask_ptr, k, words, total, BLOCK: tl.constexpr):
    """mask[row, col >> 5] |= 1 << (col & 31) for each owned id; cols [N, k] int32, -1 where not owned."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < total
    col = tl.load(cols_ptr + i, mask=live, other=-1)
    owned = live & (col >= 0)
    row = (i // k).to(tl.int64)
    col = tl.where(owned, col, 0)
    bit = tl.full([BLOCK], 1, tl.int32) << (col & 31)
    tl.atomic_or(mask_ptr + row * words + (col >> 5), bit, mask=owned)


@triton.jit
def _tile(row_ptr, mask_row_ptr, blk, words, valid, WORDS: tl.constexpr):
    """One [WORDS, 32] tile of a row: fp32 logits (-inf at padding) and whether each column is a teacher id."""
    w = blk * WORDS + tl.arange(0, WORDS)
    lane = tl.arange(0, 32)
    col = w[:, None] * 32 + lane[None, :]
    z = tl.load(row_ptr + col, mask=col < valid, other=float("-inf")).to(tl.float32)
    bits = tl.load(mask_row_ptr + w, mask=w < words, other=0)
    is_id = ((bits[:, None] >> lane[None, :]) & 1) != 0
    return col, z, is_id


# The shard widths are specialised on (Triton's default for ints): knowing `valid` divisible by 16 lets it
# prove the load mask constant over 16 columns and issue vector loads. Counts that vary per call are not.
@triton.jit(do_not_specialize=["num_blocks"])
def tail_stats_kernel(
    rows_ptr, row_stride, mask_ptr, words, valid, inv_t, out_max_ptr, out_sum_ptr, num_blocks,
    WORDS: tl.constexpr, PRECISE_EXP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = rows_ptr + row * row_stride
    mask_row_ptr = mask_ptr + row * words
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    blk = 0
    while blk < num_blocks:  # a while loop: Triton's CPU interpreter takes no runtime bound in range()
        _, z, is_id = _tile(row_ptr, mask_row_ptr, blk, words, valid, WORDS)
        m_new = _max_nan(m, tl.reduce(tl.reduce(z, 1, _max_nan), 0, _max_nan))
        # Shift by 0 while everything so far is -inf: exp(-inf - 0) = 0, where -inf - -inf would be NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        # The running sum is 0 while m is -inf; multiplying it by exp(+huge) would make it NaN.
        rescale = tl.where(m == float("-inf"), 0.0, _exp((m - shift) * inv_t, PRECISE_EXP))
        terms = tl.where(is_id, 0.0, _exp((z - shift) * inv_t, PRECISE_EXP))
        s = s * rescale + tl.sum(tl.sum(terms, axis=1), axis=0)
        m = m_new
        blk += 1
    tl.store(out_max_ptr + row, m)
    tl.store(out_sum_ptr + row, s)


@triton.jit(do_not_specialize=["num_blocks"])
def tail_grad_kernel(
    rows_ptr, row_stride, grad_ptr, grad_stride, mask_ptr, words, v_local, valid, inv_t, shift_ptr, scale_ptr,
    num_blocks, WORDS: tl.constexpr, PRECISE_EXP: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // num_blocks).to(tl.int64)
    blk = pid % num_blocks
    col, z, is_id = _tile(rows_ptr + row * row_stride, mask_ptr + row * words, blk, words, valid, WORDS)
    # shift = global max + T * log(tail sum): a row without tail mass has shift +inf and gets 0 here.
    shift = tl.load(shift_ptr + row)
    scale = tl.load(scale_ptr + row)
    g = _exp((z - shift) * inv_t, PRECISE_EXP) * scale
    g = tl.where(is_id | (col >= valid), 0.0, g)
    tl.store(grad_ptr + row * grad_stride + col, g.to(grad_ptr.dtype.element_ty), mask=col < v_local)
