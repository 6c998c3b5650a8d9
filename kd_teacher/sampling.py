"""Vocab-parallel sampling of the teacher's distribution: `n` ids per token, drawn with replacement.

The sampled payload kind (`extraction="sampled"`, random-sampling KD, Anshumann et al., ACL 2025): per token
the teacher draws `n` ids from its distribution at temperature T, p = softmax(logits / T) over the true
vocabulary, and stores the distinct ids with their counts. count / n is an unbiased estimate of p at every id,
which makes the student's cross-entropy against it an unbiased estimate of the full-vocabulary forward KL up to
the teacher's entropy (`kd_teacher.losses.sampled`). docs/sampled_kd.md derives it.

Same ids under any layout. The draws depend only on the content: each token's random stream is keyed by the
BLAKE2b hash of its sequence, its position and a seed (`token_seeds`), so a sequence gets the same ids at any
TP size, micro-batch composition or DP rank, and a resumed dump rewrites the same bytes. For that the
inverse-CDF search must not depend on how the vocabulary is split, and floating-point sums do (their order
does). So each id's mass is quantised to an integer, w = floor(exp(z / T - M) * 2^Q), with M the global max of
z / T (a max is exact, whatever the order): integer sums are exact in any order. Per token and rank:

1. M: a MAX all-reduce; w over this rank's shard; its inclusive cumulative sum (int64, exact);
2. the ranks' totals are all-gathered (TP integers per token): each rank knows its offset in the global
   cumulative sum, and the total W;
3. draw j: a target t = floor(u_j * W) from the token's stream; the one rank whose range holds t finds the id
   by binary search in its cumulative sum; the others write -1; a MAX all-reduce of the [tokens, n] ids.

Nothing of size V crosses the wire: TP x tokens totals and tokens x n ids. Q = 62 - ceil(log2(V + 1)) keeps
W < 2^62; an id whose probability is below 2^-Q of the top id's is never drawn (at most V 2^-Q of the mass in
all, 2e-8 for a 262144 vocabulary). The payload's LSE is computed as for top-k (float64 sum, fp32 result).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

# Draws per token: the payload stores n slots per token (n ids, n counts), like top-k with k = n.
MAX_DRAWS = 1024
_M32 = 0xFFFFFFFF
# Tokens per chunk: bounds the fp32 and int64 working copies to chunk x V_local x 12 bytes.
_CHUNK_TOKENS = 256


# ---- the counter-based random stream -------------------------------------------------------------------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without an int64 overflow (c a 32-bit constant)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (Wellons' "lowbias32" constants), elementwise on int64 holding uint32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _chain(words: Sequence[torch.Tensor], lane: int) -> torch.Tensor:
    h = torch.full_like(words[0], 0x9E3779B9 ^ (lane * 0x85EBCA6B) & _M32)
    for w in words:
        h = _mix32(h ^ (w & _M32))
    return h


def token_seeds(hashes: Sequence[str], seq_len: int, seed: int = 0, device=None) -> torch.Tensor:
    """[b, s] int64 keys of each token's random stream: its sequence's token hash (128-bit hex, as in the
    payload header), its position and `seed` (0 <= seed < 2^32)."""
    check_seed(seed)
    if any(len(h) != 32 for h in hashes):
        raise ValueError("token hashes must be 128-bit hex strings")
    words = torch.tensor([[int(h[i:i + 8], 16) for i in range(0, 32, 8)] for h in hashes],
                         dtype=torch.int64).reshape(len(hashes), 4)
    pos = torch.arange(seq_len, dtype=torch.int64).expand(len(hashes), seq_len)
    parts = [w.unsqueeze(1).expand_as(pos) for w in words.unbind(1)] + [torch.full_like(pos, seed), pos]
    hi, lo = _chain(parts, 1), _chain(parts, 2)
    return (((hi & 0x7FFFFFFF) << 32) | lo).to(device)  # 63 bits: no shift into the sign


def check_seed(seed) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _M32:
        raise ValueError(f"sample seed must be an integer in [0, 2^32), got {seed!r}")


def _uniforms(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """[N, n] float64 uniforms in [0, 1) with 53 random bits, draw j of token i from (seeds[i], j)."""
    j = torch.arange(n, dtype=torch.int64, device=seeds.device).expand(seeds.shape[0], n)
    hi = ((seeds >> 32) & _M32).unsqueeze(1).expand_as(j)
    lo = (seeds & _M32).unsqueeze(1).expand_as(j)
    a, b = _chain([hi, lo, j], 3), _chain([lo, hi, j], 4)
    return ((a << 21) | (b >> 11)).double() * 2.0 ** -53


# ---- the sampler ----------------------------------------------------------------------------------------------
def quantisation_bits(vocab_size: int) -> int:
    return 62 - max(1, int(vocab_size).bit_length())


def check_draws(n, vocab_size: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"draws per token must be a positive integer, got {n!r}")
    if n > MAX_DRAWS:
        raise ValueError(f"{n} draws per token is more than the maximum of {MAX_DRAWS} (a payload stores n slots a "
                         "token, and the sampler works on tokens x n draws at a time)")
    if n > vocab_size:
        raise ValueError(f"{n} draws per token exceed the vocabulary of {vocab_size} ids: a payload stores n "
                         "distinct ids a token")


def vocab_parallel_sample(
    logits: torch.Tensor,
    n: int,
    seeds: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n draws per token from softmax(logits / T) over the true vocabulary, from this rank's vocabulary shard.

    logits: [..., V_local] (the whole vocabulary when `group` is None or has one rank); seeds: [...] int64
    (`token_seeds`, in the same layout as the logits' leading dimensions). Returns counts [..., n] fp32 (draws
    of each slot's id, summing to n), ids [..., n] int64 and lse [...] fp32 (log-sum-exp of logits / T). Slots
    hold the distinct drawn ids by count descending, then id ascending; the slots left over hold count 0 and
    the smallest ids not drawn, so that a token's n ids are always distinct. Every rank returns the same.
    """
    tp = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    v_local = logits.shape[-1]
    vocab_size = v_local * tp if vocab_size is None else int(vocab_size)
    _check_args(logits, n, seeds, temperature, vocab_size, v_local * tp)
    lead = logits.shape[:-1]
    x = logits.reshape(-1, v_local)
    s = seeds.reshape(-1).to(device=logits.device, dtype=torch.int64)
    start = rank * v_local
    valid = max(0, min(v_local, vocab_size - start))
    bits = quantisation_bits(vocab_size)
    ids = torch.empty(x.shape[0], n, dtype=torch.int64, device=x.device)
    lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for lo in range(0, x.shape[0], _CHUNK_TOKENS):
        hi = min(lo + _CHUNK_TOKENS, x.shape[0])
        ids[lo:hi], lse[lo:hi] = _draw_chunk(x[lo:hi], s[lo:hi], n, temperature, start, valid, bits, tp, rank, group)
    counts, slots = count_draws(ids)
    return counts.reshape(*lead, n), slots.reshape(*lead, n), lse.reshape(lead)


def _check_args(logits, n, seeds, temperature, vocab_size, v_global) -> None:
    if logits.dim() < 1 or logits.shape[-1] == 0 or not logits.is_floating_point():
        raise ValueError(f"logits must be floating point with a vocabulary dimension, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if vocab_size > v_global:
        raise ValueError(f"true vocab size {vocab_size} is larger than the model's padded vocabulary {v_global}")
    check_draws(n, vocab_size)
    if not (0 < temperature < math.inf):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if tuple(seeds.shape) != tuple(logits.shape[:-1]) or seeds.dtype != torch.int64:
        raise ValueError(f"seeds must be int64 of shape {tuple(logits.shape[:-1])}, got {seeds.dtype} "
                         f"{tuple(seeds.shape)}")


def _draw_chunk(x, seeds, n, temperature, start, valid, bits, tp, rank, group):
    """(ids [N, n] int64, lse [N] fp32) for the rows of one chunk; a collective over `group` when tp > 1."""
    rows = x.shape[0]
    # fp32 is enough: a weight keeps exp's 24 significant bits, ~1e-7 of its probability (elementwise, so the
    # same on every layout); the LSE's sum is taken in float64.
    z = x[:, :valid].float()
    if temperature != 1.0:
        z = z / temperature
    top = z.amax(dim=1) if valid else z.new_full((rows,), -math.inf)
    # amax propagates NaN: a row with NaN or +inf logits is marked here, and its LSE made NaN through the SUM
    # all-reduce below (arithmetic carries NaN to every rank, a MAX may drop it).
    bad = torch.isnan(top) | torch.isposinf(top)
    if tp > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    # exp(z - top) <= 1. A row whose top is not finite, or that holds NaN, gets NaN or 0 here, and nan_to_num
    # leaves it no mass (its LSE, below, makes the caller refuse the payload).
    e = torch.sub(z, top.unsqueeze(1)).exp_().nan_to_num_(nan=0.0)
    part = torch.where(bad, math.nan, e.sum(dim=1, dtype=torch.float64))
    cumulative = torch.cumsum(e.mul_(2.0 ** bits).floor_().to(torch.int64), dim=1)
    mine = cumulative[:, -1] if valid else torch.zeros(rows, dtype=torch.int64, device=x.device)
    if tp > 1:
        totals = [torch.empty_like(mine) for _ in range(tp)]
        dist.all_gather(totals, mine, group=group)
        totals = torch.stack(totals)  # [tp, N]
        offset = totals[:rank].sum(dim=0)
        total = totals.sum(dim=0)
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
    else:
        offset, total = torch.zeros_like(mine), mine
    target = torch.floor(_uniforms(seeds, n) * total.double().unsqueeze(1)).to(torch.int64)
    target = torch.minimum(target, (total - 1).clamp(min=0).unsqueeze(1)) - offset.unsqueeze(1)
    owned = (target >= 0) & (target < mine.unsqueeze(1))
    if valid:
        col = torch.searchsorted(cumulative, target.clamp(min=0), right=True).clamp(max=valid - 1)
        drawn = torch.where(owned, col + start, torch.full_like(col, -1))
    else:
        drawn = torch.full((rows, n), -1, dtype=torch.int64, device=x.device)
    if tp > 1:
        dist.all_reduce(drawn, op=dist.ReduceOp.MAX, group=group)
    # A row with no mass at all (non-finite logits) draws nothing: id 0 keeps later steps in range, and its
    # non-finite LSE makes the caller refuse the payload.
    drawn = drawn.clamp(min=0)
    return drawn, (top.double() + torch.log(part)).float()


def count_draws(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws [N, n] int64 -> (counts [N, n] fp32, ids [N, n] int64): the distinct ids by count descending, then
    id ascending; the remaining slots count 0 and hold the smallest ids not drawn, ascending."""
    rows, n = draws.shape
    ordered = draws.sort(dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = first.cumsum(dim=1) - 1  # the distinct id's index of each draw
    counts = torch.zeros(rows, n, dtype=torch.int64, device=draws.device).scatter_add_(1, group, torch.ones_like(group))
    distinct = torch.zeros_like(ordered).scatter_(1, group, ordered)
    used = first.sum(dim=1, keepdim=True)
    slot = torch.arange(n, device=draws.device).expand(rows, n)
    # One sort by a key that orders (count desc, id asc), empty slots last.
    key = torch.where(slot < used, counts * 2**31 + (2**31 - 1 - distinct), torch.full_like(counts, -1))
    order = key.argsort(dim=1, descending=True, stable=True)
    counts, distinct = counts.gather(1, order), distinct.gather(1, order)
    # Fillers: at most `used` of the ids 0..n-1 were drawn, so n - used of them are free.
    taken = torch.zeros(rows, n + 1, dtype=torch.int64, device=draws.device)
    taken.scatter_(1, torch.where((slot < used) & (distinct < n), distinct, torch.full_like(distinct, n)),
                   torch.ones_like(distinct))
    free = (taken[:, :n] * n + slot).argsort(dim=1)  # free ids first, ascending
    filler = free.gather(1, (slot - used).clamp(min=0))
    ids = torch.where(slot < used, distinct, filler)
    return counts.to(torch.float32), ids
