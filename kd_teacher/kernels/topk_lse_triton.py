"""Triton kernels for one vocabulary shard's top-k and log-sum-exp pieces, reading the logits once.

Three launches, in data-flow order (the launcher is `kd_teacher.kernels.topk_lse`):

1. `chunk_candidates_kernel`, one program per (row, chunk of CHUNK columns). The chunk is loaded once into
   registers and gives, from the same registers:
   - the chunk's max of logits/T and sum of exp(logits/T - max) (the LSE pieces);
   - a superset of the chunk's top-k. The chunk is viewed as GROUPS strided groups; the k-th largest group
     maximum is a lower bound of the chunk's k-th largest value (k distinct elements reach it), so every
     element at or above it is a candidate. For logits whose order is unrelated to the column, that is
     ~1.4 k elements (rank statistics, independent of the value distribution). The candidates' columns are
     compacted into a per-chunk scratch row, re-read with their values, ranked by the exact key and the
     best KP keys stored, sorted. Only these few elements pay for key building and ranking.
   Ranking is by all-pairs comparison, not a sorting network: in Triton every stage of a bitonic network
   is a shared-memory round trip, and two 128-element sorts per chunk made a first version 18x the read
   floor on an H200.
   A chunk where this does not work out (more candidates than the scratch holds: many ties, columns
   sorted by value; or a NaN, which no comparison selects) is flagged instead.
2. `exact_chunks_kernel` redoes flagged chunks with exact keys: a bisection over the int64 key finds the
   k-th largest key, so exactly k candidates remain. A few persistent programs scan the flags; with no
   flag set it costs one small read.
3. `merge_rows_kernel`, one program per row: top-k of the chunks' sorted lists, decode columns, copy the
   raw logits (bitwise values), map padding to id -1, and combine the chunks' max/sum-exp.

Keys are the ones `kd_teacher.engine.topk.order_preserving_key` builds: order-preserving fp32 bits in the
high word, 0x7FFFFFFF - column in the low word, so that one descending order is (value desc, id asc) and
every key is unique. Columns here are shard-local; ids are `vocab_start + column`.
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
# fp32 bit pattern of -0.0 as int32: ranked as +0.0, like the reference's `+ 0.0`.
NEG_ZERO_BITS = tl.constexpr(-(2**31))
NEG_INF_BITS = tl.constexpr(-8388608)  # 0xFF800000 as int32


@triton.jit
def _max_nan(a, b):
    # torch.amax propagates NaN; tl.max would drop it.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _exp(x, PRECISE_EXP: tl.constexpr):
    if PRECISE_EXP:
        return libdevice.exp(x)
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
def _is_nan(x):
    # By the bits: a compiler may fold `x != x` to false under no-NaN assumptions.
    return (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) > 0x7F800000


@triton.jit
def _fp32_bits(x_raw):
    """fp32 bit pattern of the logits as torch's `.float()` makes it (NaN payloads kept, which a cvt may not)."""
    if x_raw.dtype == tl.bfloat16:
        return x_raw.to(tl.int16, bitcast=True).to(tl.int32) << 16
    elif x_raw.dtype == tl.float32:
        return x_raw.to(tl.int32, bitcast=True)
    else:
        return x_raw.to(tl.float32).to(tl.int32, bitcast=True)


@triton.jit
def _order_key(bits, col):
    """int64 key from fp32 bits at shard column `col`: descending key order = (value desc, column asc)."""
    bits = tl.where(bits == NEG_ZERO_BITS, 0, bits)
    b = bits.to(tl.int64)
    b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
    return (b << 32) | (0x7FFFFFFF - col.to(tl.int64))


@triton.jit
def _key_at(row_ptr, col, valid, present):
    """Exact keys of the logits at columns `col` (padding ranks as -inf, like the reference's mask)."""
    raw = tl.load(row_ptr + col, mask=present, other=0.0)
    bits = tl.where(col < valid, _fp32_bits(raw), NEG_INF_BITS)
    return tl.where(present, _order_key(bits, col), KEY_NONE)


@triton.jit
def _chunk_tile(logits_ptr, row_stride, row, chunk, v_local, valid, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """One chunk as a [GROUP_SIZE, GROUPS] tile; group g holds the chunk's columns g, g + GROUPS, ...

    Strided groups keep every group populated in a partial last chunk, so its threshold stays tight.
    Returns the raw tile and an fp32 copy in which padding and out-of-range columns are -inf.
    """
    CHUNK: tl.constexpr = GROUPS * GROUP_SIZE
    col = chunk * CHUNK + tl.arange(0, GROUP_SIZE)[:, None] * GROUPS + tl.arange(0, GROUPS)[None, :]
    in_range = col < v_local
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    raw = tl.load(row_ptr + col, mask=in_range, other=float("-inf"))
    is_valid = col < valid
    xsel = tl.where(is_valid, raw.to(tl.float32), float("-inf"))
    return row_ptr, col, in_range, is_valid, raw, xsel


@triton.jit
def _kth_largest(g, k, KP: tl.constexpr, GROUPS: tl.constexpr):
    """The k-th largest of the group maxima g [GROUPS] (ties by position)."""
    if GROUPS <= 256:
        # Rank by all-pairs comparison: a few compares per thread, no sorting network (whose stages each
        # cost a shared-memory round trip).
        i = tl.arange(0, GROUPS)
        ahead = (g[None, :] > g[:, None]) | ((g[None, :] == g[:, None]) & (i[None, :] < i[:, None]))
        rank = tl.sum(ahead.to(tl.int32), axis=1)
        return tl.sum(tl.where(rank == k - 1, g, 0.0), axis=0)
    else:
        top = tl.topk(g, KP)
        return tl.sum(tl.where(tl.arange(0, KP) == k - 1, top, 0.0), axis=0)


@triton.jit
def _emit_sorted_candidates(
    cand, col, count, row_ptr, valid, scratch_ptr, keys_ptr, KP: tl.constexpr, CAP: tl.constexpr
):
    """Compact the candidate columns (count <= CAP) and store their best KP exact keys, sorted.

    `scratch_ptr` (CAP int32) and `keys_ptr` (KP int64) are the same bytes: the chunk's output row doubles
    as its compaction buffer, so the kernel needs no memory beyond its output. Keys are placed by rank
    (all-pairs comparison in blocks of RB), not by a sorting network.
    """
    RB: tl.constexpr = 64 if CAP > 64 else CAP
    ci = cand.to(tl.int32)
    within = tl.cumsum(ci, axis=0)
    per_group = tl.sum(ci, axis=0)
    group_base = tl.cumsum(per_group, axis=0) - per_group
    pos = group_base[None, :] + within - 1
    tl.store(scratch_ptr + pos, col, mask=cand)
    tl.debug_barrier()  # other threads' scratch writes must be visible before the re-read
    j = tl.arange(0, CAP)
    present = j < count
    c = tl.load(scratch_ptr + j, mask=present, other=0, cache_modifier=".cg")
    key = _key_at(row_ptr, c, valid, present)
    rank = tl.zeros([CAP], dtype=tl.int32)
    for blk in tl.static_range(CAP // RB):
        jb = blk * RB + tl.arange(0, RB)
        pb = jb < count
        cb = tl.load(scratch_ptr + jb, mask=pb, other=0, cache_modifier=".cg")
        kb = _key_at(row_ptr, cb, valid, pb)
        # Empty slots share KEY_NONE: ties by slot keep ranks a permutation.
        ahead = (kb[None, :] > key[:, None]) | ((kb[None, :] == key[:, None]) & (jb[None, :] < j[:, None]))
        rank += tl.sum(ahead.to(tl.int32), axis=1)
    tl.debug_barrier()  # every thread has read the scratch before it is overwritten by the keys
    tl.store(keys_ptr + rank, key, mask=rank < KP)


# Sizes that vary per call are not specialised on (Triton would compile a variant per divisibility class);
# the row stride is, since 16-divisible strides give vectorised loads.
@triton.jit(do_not_specialize=["v_local", "valid", "k", "num_chunks"])
def chunk_candidates_kernel(
    logits_ptr, row_stride, v_local, valid, k, inv_t,
    keys_ptr, scratch_ptr, chunk_max_ptr, chunk_sum_ptr, flags_ptr, num_chunks,
    GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    KP: tl.constexpr, CAP: tl.constexpr, SCALE: tl.constexpr, PRECISE_EXP: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // num_chunks
    chunk = pid % num_chunks
    row_ptr, col, in_range, is_valid, raw, xsel = _chunk_tile(
        logits_ptr, row_stride, row, chunk, v_local, valid, GROUPS, GROUP_SIZE
    )

    # LSE pieces. max(x / T) == max(x) / T: scaling by a positive factor is monotonic, also when rounded.
    group_max = tl.reduce(xsel, 0, _max_nan)
    m = _scale(tl.reduce(group_max, 0, _max_nan), inv_t, SCALE)
    e = tl.where(is_valid, _exp(_scale(xsel, inv_t, SCALE) - m, PRECISE_EXP), 0.0)
    s = tl.sum(tl.sum(e, axis=1), axis=0)
    # An all -inf chunk adds nothing to a row that has a finite max (its exp() terms would be NaN here).
    s = tl.where(m == float("-inf"), 0.0, s)
    tl.store(chunk_max_ptr + pid, m)
    tl.store(chunk_sum_ptr + pid, s)

    # Candidates: elements at or above the k-th largest group maximum.
    kth = _kth_largest(group_max, k, KP, GROUPS)
    cand = in_range & (xsel >= kth)
    count = tl.sum(tl.sum(cand.to(tl.int32), axis=1), axis=0)
    need_exact = ((count > CAP) | _is_nan(m)).to(tl.int32)
    tl.store(flags_ptr + pid, need_exact.to(tl.int8))
    if need_exact == 0:
        _emit_sorted_candidates(
            cand, col, count, row_ptr, valid, scratch_ptr + pid.to(tl.int64) * CAP, keys_ptr + pid.to(tl.int64) * KP,
            KP, CAP,
        )


@triton.jit
def _exact_chunk(
    pid, logits_ptr, row_stride, v_local, valid, k, keys_ptr, scratch_ptr, num_chunks,
    GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr,
):
    CHUNK: tl.constexpr = GROUPS * GROUP_SIZE
    row = pid // num_chunks
    chunk = pid % num_chunks
    row_ptr, col, in_range, is_valid, raw, xsel = _chunk_tile(
        logits_ptr, row_stride, row, chunk, v_local, valid, GROUPS, GROUP_SIZE
    )
    bits = tl.where(is_valid, _fp32_bits(raw), NEG_INF_BITS)
    key = tl.where(in_range, _order_key(bits, col), KEY_NONE)
    k_eff = tl.minimum(k, tl.minimum(v_local - chunk * CHUNK, CHUNK))
    # Largest t with #(key >= t) >= k_eff; keys are unique, so that is the k_eff-th largest key.
    lo = tl.full([], -(2**63), tl.int64)
    hi = tl.max(tl.max(key, axis=1), axis=0)
    while lo < hi:
        mid = (lo & hi) + ((lo ^ hi) >> 1) + 1  # ceil-average without int64 overflow
        n_above = tl.sum(tl.sum((key >= mid).to(tl.int32), axis=1), axis=0)
        lo = tl.where(n_above >= k_eff, mid, lo)
        hi = tl.where(n_above >= k_eff, hi, mid - 1)
    cand = in_range & (key >= lo)
    _emit_sorted_candidates(
        cand, col, k_eff, row_ptr, valid, scratch_ptr + pid.to(tl.int64) * CAP, keys_ptr + pid.to(tl.int64) * KP,
        KP, CAP,
    )


@triton.jit(do_not_specialize=["v_local", "valid", "k", "total", "per_program", "num_chunks"])
def exact_chunks_kernel(
    logits_ptr, row_stride, v_local, valid, k, keys_ptr, scratch_ptr, flags_ptr, total, per_program, num_chunks,
    GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, KP: tl.constexpr, CAP: tl.constexpr,
    FLAG_BLOCK: tl.constexpr,
):
    # Each program owns a contiguous range of chunks and reads its flags a block at a time; with no flag
    # set that is all it does. Flagged chunks are visited in order by a vector search, not scalar loads.
    # (while loops rather than range(): Triton's CPU interpreter cannot take a runtime bound in range().)
    start = tl.program_id(0) * per_program
    end = tl.minimum(start + per_program, total)
    base = start
    while base < end:
        offs = base + tl.arange(0, FLAG_BLOCK)
        pending = tl.load(flags_ptr + offs, mask=offs < end, other=0) != 0
        while tl.max(pending.to(tl.int32), axis=0) > 0:
            t = tl.min(tl.where(pending, offs, 2147483647), axis=0)
            _exact_chunk(
                t, logits_ptr, row_stride, v_local, valid, k, keys_ptr, scratch_ptr, num_chunks,
                GROUPS, GROUP_SIZE, KP, CAP,
            )
            pending = pending & (offs != t)
        base += FLAG_BLOCK


@triton.jit(do_not_specialize=["valid", "vocab_start", "kk", "num_chunks"])
def merge_rows_kernel(
    logits_ptr, row_stride, valid, vocab_start, kk, keys_ptr, chunk_max_ptr, chunk_sum_ptr,
    out_values_ptr, out_ids_ptr, out_max_ptr, out_sum_ptr, num_chunks,
    NC_P2: tl.constexpr, KP: tl.constexpr, CHUNK: tl.constexpr,
    PRECISE_EXP: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    idx = tl.arange(0, NC_P2 * KP)
    keys = tl.load(keys_ptr + row64 * (num_chunks * KP) + idx, mask=idx < num_chunks * KP, other=KEY_NONE)
    top = tl.topk(keys, KP)
    j = tl.arange(0, KP)
    out = j < kk
    col = (0x7FFFFFFF - (top & 0x7FFFFFFF)).to(tl.int32)  # the low word is < 2**31
    row_ptr = logits_ptr + row64 * row_stride
    values = tl.load(row_ptr + col, mask=out)
    ids = tl.where(col < valid, col.to(tl.int64) + vocab_start, -1)
    tl.store(out_values_ptr + row64 * kk + j, values, mask=out)
    tl.store(out_ids_ptr + row64 * kk + j, ids, mask=out)

    c = tl.arange(0, NC_P2)
    real = c < num_chunks
    chunk_max = tl.load(chunk_max_ptr + row64 * num_chunks + c, mask=real, other=float("-inf"))
    chunk_sum = tl.load(chunk_sum_ptr + row64 * num_chunks + c, mask=real, other=0.0)
    m = tl.reduce(chunk_max, 0, _max_nan)
    # Chunks without valid columns stay out (a shard of padding only has max -inf and sum 0, as in the
    # reference); an all -inf row gives 0 * exp(NaN) = NaN, as the reference's exp(-inf - -inf) does.
    has_valid = real & (c * CHUNK < valid)
    terms = chunk_sum * _exp(chunk_max - m, PRECISE_EXP)
    s = tl.sum(tl.where(has_valid, terms, 0.0), axis=0)
    tl.store(out_max_ptr + row, m)
    tl.store(out_sum_ptr + row, s)
