"""Vocab-parallel top-k and log-sum-exp over Megatron's vocabulary shards.

With tensor parallelism each rank holds logits for a contiguous shard of the (padded) vocabulary:
rank r owns global ids [r * V_local, (r + 1) * V_local). We never gather the full vocabulary:

1. each rank takes its local top-k (padding columns >= the true vocab size masked out),
2. the k candidates per rank are all-gathered and merged into the global top-k,
3. the log-sum-exp of logits / T comes from an all-reduce of the per-token max, then of the sum of
   exponentials shifted by that max (two scalars per token).

Ties are broken by the lower vocabulary id everywhere, so results do not depend on the TP size or on the
order in which a kernel visits the vocabulary. We get that by ranking an int64 key that packs an
order-preserving image of the fp32 value in the high 32 bits and the *complemented* global id in the low
32 bits: one `topk` over the key orders by value descending, then id ascending, with no second pass.

On CUDA, the per-shard pass (steps 1 and the local max/sum-exp) runs in a fused kernel when one is available
(`kd_teacher.kernels`); this file is the reference path and the CPU path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# Tokens processed per chunk by the reference path: bounds the int64 key and fp32 copies to
# chunk x V_local x 12 bytes instead of tokens x V_local x 12.
_CHUNK_TOKENS = 1024


def order_preserving_key(values: torch.Tensor, global_ids: torch.Tensor) -> torch.Tensor:
    """int64 keys such that key order == (value descending, id ascending) order; -inf ranks lowest.

    `values` is fp32 (exact for bf16/fp16 inputs), `global_ids` int64 < 2**31. Every NaN ranks above +inf,
    as in torch.topk, whatever its sign and payload (which `+ 0.0` keeps on CPU but not on CUDA).
    """
    v = values.float() + 0.0  # + 0.0 turns -0.0 into +0.0 so that equal values compare equal
    bits = v.view(torch.int32).to(torch.int64)
    bits = torch.where(torch.isnan(v), 0x7FFFFFFF, bits)
    # IEEE-754 floats order like sign-magnitude integers: flip the magnitude bits of negatives.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits << 32) | (0x7FFFFFFF - global_ids)


def _check_args(logits: torch.Tensor, k: int, temperature: float, vocab_size: int, vocab_start: int, v_global: int):
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not (isinstance(k, int) and k > 0):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if vocab_size > v_global:
        raise ValueError(
            f"true vocab size {vocab_size} is larger than the model's padded vocabulary {v_global} "
            f"(logits shard {logits.shape[-1]} x TP)"
        )
    if k > vocab_size:
        raise ValueError(f"k={k} is larger than the true vocabulary size {vocab_size}")
    if not (temperature > 0 and temperature == temperature and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def _topk_positions(x: torch.Tensor, kk: int) -> torch.Tensor:
    """Columns of the kk largest of each row of fp32 `x`, by value descending then column ascending.

    A float `topk` is ~5x cheaper than ranking int64 keys over the whole row, and exact unless ties reach
    the k-th place. So: float topk, re-sort the kk picks by key (cheap), and redo with full keys only the
    rows where the k-th value also occurs outside the picks (or a NaN makes comparisons meaningless).
    """
    vals, pos = torch.topk(x, kk, dim=-1, sorted=True)
    order = torch.argsort(order_preserving_key(vals, pos), dim=-1, descending=True)
    pos = torch.gather(pos, -1, order)
    boundary_ties = torch.count_nonzero(x >= vals[:, -1:], dim=-1) != kk
    redo = (boundary_ties | torch.isnan(x).any(dim=-1)).nonzero().squeeze(-1)
    if redo.numel():
        sub = x[redo]
        cols = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64).expand_as(sub)
        pos[redo] = torch.topk(order_preserving_key(sub, cols), kk, dim=-1, sorted=True).indices
    return pos


def local_topk_stats(
    logits: torch.Tensor, k: int, temperature: float, vocab_start: int, valid: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One shard's candidates and normaliser pieces; the reference for the fused kernel.

    logits: [N, V_local]; columns >= `valid` are padding. Returns (values [N, k'] in the logits dtype,
    global ids [N, k'] int64 (-1 where fewer than k' valid columns), max of logits/T [N] fp32,
    sum of exp(logits/T - max) [N] fp32), with k' = min(k, V_local).
    """
    n, v_local = logits.shape
    kk = min(k, v_local)
    out_v = torch.empty(n, kk, dtype=logits.dtype, device=logits.device)
    out_i = torch.empty(n, kk, dtype=torch.int64, device=logits.device)
    out_m = torch.empty(n, dtype=torch.float32, device=logits.device)
    out_s = torch.empty(n, dtype=torch.float32, device=logits.device)
    is_pad = torch.arange(v_local, device=logits.device) >= valid
    for lo in range(0, n, _CHUNK_TOKENS):
        x = logits[lo : lo + _CHUNK_TOKENS].float()
        if valid < v_local:
            x = x.masked_fill(is_pad, float("-inf"))
        pos = _topk_positions(x, kk)
        out_v[lo : lo + _CHUNK_TOKENS] = torch.gather(logits[lo : lo + _CHUNK_TOKENS], -1, pos)
        gid = pos + vocab_start
        out_i[lo : lo + _CHUNK_TOKENS] = torch.where(pos < valid, gid, torch.full_like(gid, -1))
        if valid > 0:
            xt = x[:, :valid] / temperature if temperature != 1.0 else x[:, :valid]
            m = xt.amax(dim=-1)
            out_m[lo : lo + _CHUNK_TOKENS] = m
            out_s[lo : lo + _CHUNK_TOKENS] = (xt - m.unsqueeze(-1)).exp_().sum(dim=-1)
        else:
            out_m[lo : lo + _CHUNK_TOKENS] = float("-inf")
            out_s[lo : lo + _CHUNK_TOKENS] = 0.0
    return out_v, out_i, out_m, out_s


def _local_stats(logits2d, k, temperature, vocab_start, valid):
    """Dispatch to the fused CUDA kernel when present, else the reference path."""
    if logits2d.is_cuda:
        try:
            from kd_teacher.kernels import fused_local_topk_stats
        except ImportError:
            fused_local_topk_stats = None
        if fused_local_topk_stats is not None:
            out = fused_local_topk_stats(logits2d, k, temperature, vocab_start, valid)
            if out is not None:
                return out
    return local_topk_stats(logits2d, k, temperature, vocab_start, valid)


def merge_candidates(values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k from candidates [N, C] (C = TP x k'); invalid candidates carry id -1."""
    invalid = ids < 0
    key = order_preserving_key(
        values.float().masked_fill(invalid, float("-inf")), torch.where(invalid, torch.zeros_like(ids), ids)
    )
    _, pos = torch.topk(key, k, dim=-1, sorted=True)
    return torch.gather(values, -1, pos), torch.gather(ids, -1, pos)


def check_finite_lse(lses: list) -> None:
    """Raise if any log-sum-exp is NaN or inf (non-finite teacher logits): one host sync for all of them."""
    if lses and not torch.stack([torch.isfinite(x).all() for x in lses]).all():
        raise FloatingPointError("non-finite logits (NaN or inf) in the teacher output: the LSE is not finite")


def vocab_parallel_topk(
    logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global top-k values/ids and full-vocabulary LSE of logits/T from this rank's vocabulary shard.

    logits: [..., V_local], this rank's contiguous shard of the padded vocabulary (the whole vocabulary when
    `group` is None or has one rank). `vocab_size` is the true vocabulary; columns at or beyond it are
    padding and never selected or counted (default: no padding).

    Returns values [..., k] (the raw logits, same dtype as the input), indices [..., k] (int64 global ids,
    sorted by value descending, ties by lower id) and lse [...] (fp32 log-sum-exp of logits / T).
    check_finite=False leaves the non-finite check to the caller (`check_finite_lse`): on a GPU it makes the
    host wait for the forward, so a caller with more host work to queue does it once, at its end.
    """
    tp = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    v_local = logits.shape[-1]
    v_global = v_local * tp
    vocab_size = v_global if vocab_size is None else int(vocab_size)
    vocab_start = rank * v_local
    _check_args(logits, k, temperature, vocab_size, vocab_start, v_global)

    lead = logits.shape[:-1]
    x = logits.reshape(-1, v_local)
    valid = max(0, min(v_local, vocab_size - vocab_start))
    cand_v, cand_i, m, s = _local_stats(x, k, temperature, vocab_start, valid)

    if tp > 1:
        # Merge candidates: only k values + k ids per token and rank cross the wire.
        gathered_v = [torch.empty_like(cand_v) for _ in range(tp)]
        gathered_i = [torch.empty_like(cand_i) for _ in range(tp)]
        dist.all_gather(gathered_v, cand_v.contiguous(), group=group)
        dist.all_gather(gathered_i, cand_i.contiguous(), group=group)
        cand_v = torch.cat(gathered_v, dim=-1)
        cand_i = torch.cat(gathered_i, dim=-1)
        # Normaliser: global max, then the local sums rescaled to it and summed.
        m_global = m.clone()
        dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=group)
        # A rank with only padding has m = -inf: exp(-inf - m_global) = 0 keeps its sum out. NaNs are left
        # to propagate through the sum so that every rank sees them and raises below.
        s = s * torch.exp(m - m_global)
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
        m = m_global
    if tp > 1 or cand_v.shape[-1] != k:
        values, indices = merge_candidates(cand_v, cand_i, k)
    else:  # one shard: its candidates are already the top-k, in (value desc, id asc) order
        values, indices = cand_v, cand_i
    # In float64, rounded once: an fp32 `m + log(s)` rounds twice and cost up to 3 ulp of the result.
    lse = (m.double() + torch.log(s.double())).float()
    if check_finite:
        check_finite_lse([lse])
    return values.reshape(*lead, k), indices.reshape(*lead, k), lse.reshape(lead)
