"""Triton kernels of the fused cross-entropy + KD pass (`kd_teacher.losses.ce_kd`), one vocabulary shard.

The student's cross-entropy and the KD term read the same logits: the CE needs the max and sum of exps over
every column of the shard (Megatron's CE includes its vocabulary padding), the KD term the max over the true
vocabulary and the tail sum of exp((z - max) / T) over the columns that are not teacher ids. One pass computes
both, and one backward pass writes one gradient: CE's softmax weighted by its upstream gradient plus the KD
tail's gradient, summed in fp32 and rounded once to the logits' dtype (the teacher ids and their own terms
are added by the caller from [N, k] values; see `ce_kd_grad_kernel`).

Columns are `kd_loss_triton`'s [WORDS, 32] tiles (its `_tile`, bounded here by the shard width, not the true
vocabulary: the CE counts the padding), with the same id bitmask and online max/sum rescaling; the launcher is
`kd_teacher.kernels.ce_kd`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kd_teacher.kernels.kd_loss_triton import _exp, _max_nan, _tile


@triton.jit
def _online(m, z, scale, PRECISE_EXP: tl.constexpr):
    """A running max m and sum of exp((z - m) * scale), one more tile of z on (-inf terms add 0): returns the
    new max, the factor that rescales the old sum to it, and the tile's exps against it."""
    m_new = _max_nan(m, tl.reduce(tl.reduce(z, 1, _max_nan), 0, _max_nan))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp(-inf - 0) = 0, not NaN
    rescale = tl.where(m == float("-inf"), 0.0, _exp((m - shift) * scale, PRECISE_EXP))
    return m_new, rescale, _exp((z - shift) * scale, PRECISE_EXP)


# Shard widths are specialised on (vector loads, see kd_loss_triton); per-call counts are not.
@triton.jit(do_not_specialize=["num_blocks"])
def ce_kd_stats_kernel(
    rows_ptr, row_stride, mask_ptr, words, v_local, valid, inv_t,
    out_max_all_ptr, out_sum_all_ptr, out_max_valid_ptr, out_tail_ptr, num_blocks,
    WORDS: tl.constexpr, SAME_SHIFT: tl.constexpr, PRECISE_EXP: tl.constexpr,
):
    """Per row: max and sum of exp(z - max) over all v_local columns (the CE's), max over the `valid` columns
    and tail sum of exp((z - max_valid) * inv_t) over valid non-id columns (the KD term's). SAME_SHIFT
    (no padding in the shard and T = 1): both maxes are one and the tail's exps are the CE's, so one exp."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = rows_ptr + row * row_stride
    mask_row_ptr = mask_ptr + row * words
    m_all = tl.full([], float("-inf"), tl.float32)
    s_all = tl.full([], 0.0, tl.float32)
    m_val = tl.full([], float("-inf"), tl.float32)
    s_tail = tl.full([], 0.0, tl.float32)
    blk = 0
    while blk < num_blocks:  # a while loop: the CPU interpreter takes no runtime bound in range()
        # Every column of the shard (the CE's); the KD term's `valid` bound is applied below.
        col, z, is_id = _tile(row_ptr, mask_row_ptr, blk, words, v_local, WORDS)
        m_all, rescale_all, e_all = _online(m_all, z, 1.0, PRECISE_EXP)
        s_all = s_all * rescale_all + tl.sum(tl.sum(e_all, axis=1), axis=0)
        if SAME_SHIFT:
            terms = tl.where(is_id, 0.0, e_all)
            s_tail = s_tail * rescale_all + tl.sum(tl.sum(terms, axis=1), axis=0)
        else:
            z_val = tl.where(col < valid, z, float("-inf"))
            m_val, rescale_val, e_val = _online(m_val, z_val, inv_t, PRECISE_EXP)
            terms = tl.where(is_id, 0.0, e_val)
            s_tail = s_tail * rescale_val + tl.sum(tl.sum(terms, axis=1), axis=0)
        blk += 1
    if SAME_SHIFT:
        m_val = m_all
    tl.store(out_max_all_ptr + row, m_all)
    tl.store(out_sum_all_ptr + row, s_all)
    tl.store(out_max_valid_ptr + row, m_val)
    tl.store(out_tail_ptr + row, s_tail)


@triton.jit(do_not_specialize=["num_blocks"])
def ce_kd_grad_kernel(
    rows_ptr, row_stride, grad_ptr, grad_stride, mask_ptr, words, v_local, valid, inv_t,
    label_ptr, ce_grad_ptr, ce_shift_ptr, kd_shift_ptr, kd_scale_ptr, num_blocks,
    WORDS: tl.constexpr, TAIL: tl.constexpr, PRECISE_EXP: tl.constexpr,
):
    """Gradient of one tile, in fp32, stored once in the logits' dtype:
        ce_grad * exp(z - ce_shift)                                       every column (CE: softmax)
      + kd_scale * exp((z - kd_shift) * inv_t)                            valid non-id columns (KD tail; TAIL)
      - ce_grad                                                           the label's column, if not an id
    and 0 at the teacher ids (their whole gradient is added by the caller from [N, k] values)."""
    pid = tl.program_id(0)
    row = (pid // num_blocks).to(tl.int64)
    blk = pid % num_blocks
    col, z, is_id = _tile(rows_ptr + row * row_stride, mask_ptr + row * words, blk, words, v_local, WORDS)
    ce_grad = tl.load(ce_grad_ptr + row)
    g = ce_grad * _exp(z - tl.load(ce_shift_ptr + row), PRECISE_EXP)  # ce_shift = max + log sum: <= 1
    if TAIL:
        # kd_shift = valid max + T log tail: a row without tail mass has kd_shift +inf and gets 0 here.
        kd = tl.load(kd_scale_ptr + row) * _exp((z - tl.load(kd_shift_ptr + row)) * inv_t, PRECISE_EXP)
        g += tl.where(col < valid, kd, 0.0)
    label = tl.load(label_ptr + row)
    g = tl.where(col == label, g - ce_grad, g)
    g = tl.where(is_id, 0.0, g)
    tl.store(grad_ptr + row * grad_stride + col, g.to(grad_ptr.dtype.element_ty), mask=col < v_local)
