"""Triton kernels for one vocabulary shard's top-k and log-sum-exp pieces, reading the logits once.

Kernels in data-flow order (the launcher is `kd_teacher.kernels.topk_lse`):

1. `chunk_stats_kernel`, one program per (row, chunk of CHUNK columns): streaming. From one load of the
   chunk it writes the chunk's max of logits/T, its sum of exp(logits/T - max), and the maximum of every
   group of GROUP_SIZE consecutive columns (1/GROUP_SIZE of the bytes read: 3% at 64 bf16 columns).
   With SELECT, the last of a row's programs to finish (an arrival counter per row) then does the row's
   selection (`_select_row`, below) itself: the row's group maxima and the groups it re-reads are still in
   L2, and the selection's latency can overlap other programs' streaming. That pays only at the streaming
   pass's own occupancy: on an H200, at 3 programs per multiprocessor instead of 4, fused (1.38 ms) was no
   faster than the selection as a launch of its own (1.34 ms; [8192, 128256] bf16, k=64).
2. `_select_row` (inside 1, or as `row_topk_kernel`, one program per row). The k-th largest group maximum
   of the row (a bisection over its order-preserving bits) is a lower bound of the row's k-th largest
   logit, since k distinct elements reach it; every top-k element lies in a group whose maximum reaches
   it, and there are exactly k such groups unless group maxima tie. Only those groups are read again
   (k x GROUP_SIZE columns, ~3% of the row), their elements at or above the bound (k + a few: rank
   statistics, whatever the distribution) are compacted, ranked by the exact key (all-pairs comparison,
   no sorting network: in Triton each stage of one is a shared-memory round trip) and written out: values
   copied bitwise, ids, and the row's max and sum of exponentials combined from the chunks. A row where
   the bound lets too many through (massive ties, e.g. integer logits, or an all -inf row) is flagged.
3. `exact_rows_kernel` redoes flagged rows: a bisection over the row's int64 keys finds the k-th largest
   key exactly, then the k elements at or above it are compacted and ranked. A few persistent programs
   scan the flags; with none set that is one small read each.

Keys are the ones `kd_teacher.topk.order_preserving_key` builds: order-preserving fp32 bits in the
high word (every NaN, whatever its sign or payload, above +inf), 0x7FFFFFFF - column in the low word, so
that one descending order is (value desc, id asc) and every key is unique. Group maxima propagate NaN, so
a NaN's group is always re-read and a NaN row needs no special path. Columns here are shard-local; ids are
`vocab_start + column`.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # precise expf (CUDA's own algorithm); the CPU interpreter has no libdevice
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old Triton
    libdevice = None

# Smaller than every real key (whose low word 0x7FFFFFFF - col is > 0): marks empty slots.
KEY_NONE = tl.constexpr(-(2**63))
INT32_MIN = tl.constexpr(-(2**31))  # also the fp32 bits of -0.0, ranked as +0.0 like the reference's `+ 0.0`
NEG_INF_BITS = tl.constexpr(-8388608)  # 0xFF800000, -inf, as int32


@triton.jit
def _max_nan(a, b):
    # torch.amax propagates NaN; tl.max would drop it.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _exp(x, EXP_IMPL: tl.constexpr):
    # 0: libdevice expf, torch's own algorithm (~8 instructions); 1: tl.exp, ex2.approx with a fix-up for
    # results below fp32's normal range (what Triton's CPU interpreter runs); 2: ex2.approx.ftz alone,
    # which flushes those results to 0: they are under 1e-38 of the max, and the sum is >= 1.
    if EXP_IMPL == 0:
        return libdevice.exp(x)
    elif EXP_IMPL == 2:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * 1.4426950408889634], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp(x)


@triton.jit
def _scale(x, inv_t, SCALE: tl.constexpr):
    # torch on CUDA computes `x / T` for a Python-scalar T as x * fp32(1 / T); the reference skips T == 1.
    if SCALE:
        return x * inv_t
    else:
        return x


@triton.jit
def _fp32_bits(x_raw):
    """fp32 bit pattern of the logits as torch's `.float()` makes it (by the bits: exact, and no NaN folding)."""
    if x_raw.dtype == tl.bfloat16:
        return x_raw.to(tl.int16, bitcast=True).to(tl.int32) << 16
    elif x_raw.dtype == tl.float32:
        return x_raw.to(tl.int32, bitcast=True)
    else:
        return x_raw.to(tl.float32).to(tl.int32, bitcast=True)


@triton.jit
def _ordered(bits):
    """int32 image of fp32 bits whose signed order is the value order (-0.0 == +0.0, -inf lowest, NaN highest).

    Every NaN maps to 0x7FFFFFFF, above +inf: torch.topk ranks NaN largest, and the reference's key does
    the same (on CUDA its `+ 0.0` already makes every NaN the canonical 0x7FFFFFFF, sign bit included).
    """
    bits = tl.where(bits == INT32_MIN, 0, bits)
    bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FFFFFFF, bits)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key(bits, col):
    """int64 key: descending key order = (value desc, column asc)."""
    return (_ordered(bits).to(tl.int64) << 32) | (0x7FFFFFFF - col.to(tl.int64))


@triton.jit
def _bits_at(row_ptr, col, valid, present):
    """fp32 bits of the logits at `col`; padding (col >= valid) reads as -inf, like the reference's mask."""
    raw = tl.load(row_ptr + col, mask=present, other=0.0)
    return tl.where(col < valid, _fp32_bits(raw), NEG_INF_BITS)


@triton.jit
def _ceil_mid(lo, hi):
    # (lo + hi + 1) // 2 without overflow, for lo < hi.
    return (lo & hi) + ((lo ^ hi) >> 1) + 1


@triton.jit
def _stream_chunk(
    row, chunk, logits_ptr, row_stride, valid, inv_t, chunk_max_ptr, chunk_sum_ptr, group_max_ptr,
    num_chunks, num_groups,
    GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE: tl.constexpr, EXP_IMPL: tl.constexpr,
):
    """One chunk's max of logits/T, sum of exp(logits/T - max) and group maxima, from one load."""
    g = chunk * GROUPS + tl.arange(0, GROUPS)
    col = g[:, None] * GROUP_SIZE + tl.arange(0, GROUP_SIZE)[None, :]
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    # Padding and out-of-range columns read as -inf: out of the max, exp() = 0 in the sum.
    xsel = tl.load(row_ptr + col, mask=col < valid, other=float("-inf")).to(tl.float32)

    # NaN-propagating, like torch.amax: a NaN's group then ranks first (see _ordered) and is re-read.
    group_max = tl.reduce(xsel, 1, _max_nan)
    tl.store(group_max_ptr + row.to(tl.int64) * num_groups + g, group_max, mask=g < num_groups)
    # max(x / T) == max(x) / T: scaling by a positive factor is monotonic, also when rounded.
    m = _scale(tl.reduce(group_max, 0, _max_nan), inv_t, SCALE)
    # A NaN max makes the sum NaN, and a +inf one too (inf - inf), as in the reference.
    s = tl.sum(tl.sum(_exp(_scale(xsel, inv_t, SCALE) - m, EXP_IMPL), axis=1), axis=0)
    # An all -inf chunk adds nothing to a row that has a finite max (its exp() terms would be NaN here).
    s = tl.where(m == float("-inf"), 0.0, s)
    pid = row * num_chunks + chunk
    tl.store(chunk_max_ptr + pid, m)
    tl.store(chunk_sum_ptr + pid, s)


@triton.jit
def _write_ranked(
    row, row_ptr, scratch_ptr, count, valid, vocab_start, kk, out_values_ptr, out_ids_ptr, CAP: tl.constexpr
):
    """Rank the `count` (<= CAP) compacted columns in scratch by exact key and write the best kk out."""
    RB: tl.constexpr = 4096 // CAP if CAP <= 1024 else 4  # [CAP, RB] int64 compares per block
    j = tl.arange(0, CAP)
    present = j < count
    c = tl.load(scratch_ptr + j, mask=present, other=0, cache_modifier=".cg")
    key = tl.where(present, _key(_bits_at(row_ptr, c, valid, present), c), KEY_NONE)
    rank = tl.zeros([CAP], dtype=tl.int32)
    first = 0
    while first < count:  # blocks past `count` hold only empty slots, which are ranked last anyway
        jb = first + tl.arange(0, RB)
        pb = jb < count
        cb = tl.load(scratch_ptr + jb, mask=pb, other=0, cache_modifier=".cg")
        kb = tl.where(pb, _key(_bits_at(row_ptr, cb, valid, pb), cb), KEY_NONE)
        # Empty slots share KEY_NONE: ties by slot keep the ranks a permutation.
        ahead = (kb[None, :] > key[:, None]) | ((kb[None, :] == key[:, None]) & (jb[None, :] < j[:, None]))
        rank += tl.sum(ahead.to(tl.int32), axis=1)
        first += RB
    out = present & (rank < kk)
    row64 = row.to(tl.int64)
    tl.store(out_values_ptr + row64 * kk + rank, tl.load(row_ptr + c, mask=out), mask=out)
    tl.store(out_ids_ptr + row64 * kk + rank, tl.where(c < valid, c.to(tl.int64) + vocab_start, -1), mask=out)


@triton.jit
def _select_row(
    row, logits_ptr, row_stride, v_local, valid, vocab_start, kk,
    chunk_max_ptr, chunk_sum_ptr, group_max_ptr, scratch_groups_ptr, scratch_cols_ptr, flags_ptr,
    out_values_ptr, out_ids_ptr, out_max_ptr, out_sum_ptr, num_chunks, num_groups,
    NC_P2: tl.constexpr, NG_P2: tl.constexpr, GROUP_SIZE: tl.constexpr, CHUNK: tl.constexpr,
    GCAP: tl.constexpr, CAP: tl.constexpr, EXP_IMPL: tl.constexpr,
):
    """The row's max, sum of exponentials and top kk from its chunks' statistics (see the module doc).

    Statistics are read with .cg (from L2): in the fused launch other programs wrote them, and L1 is not
    coherent across multiprocessors.
    """
    row64 = row.to(tl.int64)
    row_ptr = logits_ptr + row64 * row_stride

    # The row's max and sum of exponentials from its chunks'.
    c = tl.arange(0, NC_P2)
    real = c < num_chunks
    chunk_max = tl.load(chunk_max_ptr + row64 * num_chunks + c, mask=real, other=float("-inf"), cache_modifier=".cg")
    chunk_sum = tl.load(chunk_sum_ptr + row64 * num_chunks + c, mask=real, other=0.0, cache_modifier=".cg")
    m = tl.reduce(chunk_max, 0, _max_nan)
    # Chunks without valid columns stay out (a shard of padding only has max -inf and sum 0, as in the
    # reference); an all -inf row gives 0 * exp(NaN) = NaN, as the reference's exp(-inf - -inf) does.
    # float64 for the few terms: free next to the streaming, and it keeps this step's rounding out of the LSE.
    terms = chunk_sum.to(tl.float64) * _exp(chunk_max - m, EXP_IMPL).to(tl.float64)
    s = tl.sum(tl.where(real & (c * CHUNK < valid), terms, 0.0), axis=0).to(tl.float32)
    tl.store(out_max_ptr + row, m)
    tl.store(out_sum_ptr + row, s)

    # Lower bound: the kk-th largest group maximum (largest t with #(group max >= t) >= kk).
    gi = tl.arange(0, NG_P2)
    gmax = tl.load(group_max_ptr + row64 * num_groups + gi, mask=gi < num_groups, other=float("-inf"),
                   cache_modifier=".cg")
    ob = tl.where(gi < num_groups, _ordered(gmax.to(tl.int32, bitcast=True)), INT32_MIN)
    # bf16 logits carry 16 significant bits: bisect on those (16 steps, each a block-wide count).
    SHIFT: tl.constexpr = 16 if logits_ptr.dtype.element_ty == tl.bfloat16 else 0
    obs = ob >> SHIFT
    lo = tl.full([], -(2**31), tl.int32) >> SHIFT
    hi = tl.max(obs, axis=0)
    while lo < hi:
        mid = _ceil_mid(lo, hi)
        enough = tl.sum((obs >= mid).to(tl.int32), axis=0) >= kk
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    lo = lo << SHIFT  # every value whose high bits reach lo's compares >= it in full
    cand_group = (ob >= lo) & (gi < num_groups)
    n_groups = tl.sum(cand_group.to(tl.int32), axis=0)
    if n_groups <= GCAP:
        # Compact the candidate groups' ids, then read those groups again, GSLICE groups at a time: a
        # [GCAP, GROUP_SIZE] tile at once took 168 registers a thread (3 programs of 4 warps per
        # multiprocessor), and usually half of it was empty (n_groups ~ kk, GCAP = 2 kp).
        gpos = tl.cumsum(cand_group.to(tl.int32), axis=0) - 1
        tl.store(scratch_groups_ptr + row64 * GCAP + gpos, gi, mask=cand_group)
        tl.debug_barrier()  # other threads' scratch writes must be visible before the re-read
        GSLICE: tl.constexpr = GCAP if GCAP * GROUP_SIZE <= 2048 else 2048 // GROUP_SIZE
        count = tl.full([], 0, tl.int32)
        first = 0
        while first < n_groups:
            slot = first + tl.arange(0, GSLICE)
            gid = tl.load(scratch_groups_ptr + row64 * GCAP + slot, mask=slot < n_groups, other=0,
                          cache_modifier=".cg")
            col = gid[:, None] * GROUP_SIZE + tl.arange(0, GROUP_SIZE)[None, :]
            present = (slot < n_groups)[:, None] & (col < v_local)
            cand = present & (_ordered(_bits_at(row_ptr, col, valid, present)) >= lo)
            ci = cand.to(tl.int32)
            per_group = tl.sum(ci, axis=1)
            pos = count + (tl.cumsum(per_group, axis=0) - per_group)[:, None] + tl.cumsum(ci, axis=1) - 1
            tl.store(scratch_cols_ptr + row64 * CAP + pos, col, mask=cand & (pos < CAP))
            count += tl.sum(per_group, axis=0)
            first += GSLICE
        if count <= CAP:
            tl.debug_barrier()
            _write_ranked(row, row_ptr, scratch_cols_ptr + row64 * CAP, count, valid, vocab_start, kk,
                          out_values_ptr, out_ids_ptr, CAP)
            tl.store(flags_ptr + row, 0)
        else:
            tl.store(flags_ptr + row, 1)
    else:
        tl.store(flags_ptr + row, 1)


# Counts that vary per call are not specialised on (Triton would compile a variant per divisibility class).
# The row stride and the shard widths are: knowing them divisible by 16 lets Triton prove the load masks
# constant over 16 columns and issue vector loads (without it, this pass ran at 3x the read floor).
@triton.jit(do_not_specialize=["vocab_start", "kk", "num_chunks", "num_groups"])
def chunk_stats_kernel(
    logits_ptr, row_stride, v_local, valid, inv_t, vocab_start, kk,
    chunk_max_ptr, chunk_sum_ptr, group_max_ptr, arrivals_ptr, scratch_groups_ptr, scratch_cols_ptr, flags_ptr,
    out_values_ptr, out_ids_ptr, out_max_ptr, out_sum_ptr, num_chunks, num_groups,
    GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE: tl.constexpr, EXP_IMPL: tl.constexpr,
    SELECT: tl.constexpr, NC_P2: tl.constexpr, NG_P2: tl.constexpr, GCAP: tl.constexpr, CAP: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // num_chunks
    chunk = pid % num_chunks
    _stream_chunk(row, chunk, logits_ptr, row_stride, valid, inv_t, chunk_max_ptr, chunk_sum_ptr, group_max_ptr,
                  num_chunks, num_groups, GROUPS, GROUP_SIZE, SCALE, EXP_IMPL)
    if SELECT:
        # Every thread's statistics stores precede the arrival (barrier), and the arrival releases them
        # at GPU scope; the last arrival acquires all the row's before it reads them.
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + row, 1, sem="acq_rel", scope="gpu")
        if arrived == num_chunks - 1:
            _select_row(row, logits_ptr, row_stride, v_local, valid, vocab_start, kk,
                        chunk_max_ptr, chunk_sum_ptr, group_max_ptr, scratch_groups_ptr, scratch_cols_ptr, flags_ptr,
                        out_values_ptr, out_ids_ptr, out_max_ptr, out_sum_ptr, num_chunks, num_groups,
                        NC_P2, NG_P2, GROUP_SIZE, GROUPS * GROUP_SIZE, GCAP, CAP, EXP_IMPL)


@triton.jit(do_not_specialize=["vocab_start", "kk", "num_chunks", "num_groups"])
def row_topk_kernel(
    logits_ptr, row_stride, v_local, valid, vocab_start, kk,
    chunk_max_ptr, chunk_sum_ptr, group_max_ptr, scratch_groups_ptr, scratch_cols_ptr, flags_ptr,
    out_values_ptr, out_ids_ptr, out_max_ptr, out_sum_ptr, num_chunks, num_groups,
    NC_P2: tl.constexpr, NG_P2: tl.constexpr, GROUP_SIZE: tl.constexpr, CHUNK: tl.constexpr,
    GCAP: tl.constexpr, CAP: tl.constexpr, EXP_IMPL: tl.constexpr,
):
    # The unfused selection: one program per row, after the streaming launch.
    _select_row(tl.program_id(0), logits_ptr, row_stride, v_local, valid, vocab_start, kk,
                chunk_max_ptr, chunk_sum_ptr, group_max_ptr, scratch_groups_ptr, scratch_cols_ptr, flags_ptr,
                out_values_ptr, out_ids_ptr, out_max_ptr, out_sum_ptr, num_chunks, num_groups,
                NC_P2, NG_P2, GROUP_SIZE, CHUNK, GCAP, CAP, EXP_IMPL)


@triton.jit
def _row_keys(row_ptr, start, v_local, valid, TILE: tl.constexpr):
    col = start + tl.arange(0, TILE)
    present = col < v_local
    return col, tl.where(present, _key(_bits_at(row_ptr, col, valid, present), col), KEY_NONE)


@triton.jit
def _exact_row(
    row, logits_ptr, row_stride, v_local, valid, vocab_start, kk, scratch_cols_ptr, out_values_ptr, out_ids_ptr,
    CAP: tl.constexpr, TILE: tl.constexpr,
):
    row64 = row.to(tl.int64)
    row_ptr = logits_ptr + row64 * row_stride
    # Largest t with #(key >= t) >= kk; keys are unique, so that is the kk-th largest key.
    hi = tl.full([], -(2**63), tl.int64)
    start = 0
    while start < v_local:
        _, key = _row_keys(row_ptr, start, v_local, valid, TILE)
        hi = tl.maximum(hi, tl.max(key, axis=0))
        start += TILE
    lo = tl.full([], -(2**63), tl.int64)
    while lo < hi:
        mid = _ceil_mid(lo, hi)
        n_above = tl.full([], 0, tl.int32)
        start = 0
        while start < v_local:
            _, key = _row_keys(row_ptr, start, v_local, valid, TILE)
            n_above += tl.sum((key >= mid).to(tl.int32), axis=0)
            start += TILE
        lo = tl.where(n_above >= kk, mid, lo)
        hi = tl.where(n_above >= kk, hi, mid - 1)
    # Exactly kk keys reach lo: compact their columns, then rank them.
    base = tl.full([], 0, tl.int32)
    start = 0
    while start < v_local:
        col, key = _row_keys(row_ptr, start, v_local, valid, TILE)
        cand = key >= lo
        pos = base + tl.cumsum(cand.to(tl.int32), axis=0) - 1
        tl.store(scratch_cols_ptr + row64 * CAP + pos, col, mask=cand)
        base += tl.sum(cand.to(tl.int32), axis=0)
        start += TILE
    tl.debug_barrier()
    _write_ranked(row, row_ptr, scratch_cols_ptr + row64 * CAP, kk, valid, vocab_start, kk,
                  out_values_ptr, out_ids_ptr, CAP)


@triton.jit(do_not_specialize=["v_local", "valid", "vocab_start", "kk", "n_rows", "per_program"])
def exact_rows_kernel(
    logits_ptr, row_stride, v_local, valid, vocab_start, kk, scratch_cols_ptr, flags_ptr,
    out_values_ptr, out_ids_ptr, n_rows, per_program,
    CAP: tl.constexpr, TILE: tl.constexpr, FLAG_BLOCK: tl.constexpr,
):
    # Each program owns a contiguous range of rows and reads their flags a block at a time; flagged rows
    # are visited by a vector search. (while loops, not range(): Triton's CPU interpreter cannot take a
    # runtime bound in range().)
    start = tl.program_id(0) * per_program
    end = tl.minimum(start + per_program, n_rows)
    base = start
    while base < end:
        offs = base + tl.arange(0, FLAG_BLOCK)
        pending = tl.load(flags_ptr + offs, mask=offs < end, other=0) != 0
        while tl.max(pending.to(tl.int32), axis=0) > 0:
            row = tl.min(tl.where(pending, offs, 2147483647), axis=0)
            _exact_row(row, logits_ptr, row_stride, v_local, valid, vocab_start, kk, scratch_cols_ptr,
                       out_values_ptr, out_ids_ptr, CAP, TILE)
            pending = pending & (offs != row)
        base += FLAG_BLOCK
