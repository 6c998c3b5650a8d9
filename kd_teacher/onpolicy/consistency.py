"""`onpolicy logprob gap`: each generated token's log-prob at sampling time against the training forward's.

The sampling-time log-prob is what Megatron-Core's controller returns for the token it sampled: `log_softmax`
of the logits it sampled from. Our generation hook hands the controller those logits in fp32 with the
padding columns at -inf (`generation._TrueVocabularyFp32Logits`), so its `log_softmax` is exact. Here the
training forward's logits of the same sequence (the output layer's, as the KD hook captures them) go through
the very same function: fp32, the full padded width with padding at -inf, one `log_softmax` per row. With
tensor parallelism the rows are gathered first, a chunk at a time, so that the function is the same one and
not a vocab-parallel equivalent that rounds differently. So the gap is zero exactly when the two forwards
give the same logits, and whatever it is otherwise comes from the forwards (KV-cached decode against one
full-sequence forward, batch shapes, kernels), not from how log-probs were computed.

Reported per micro-batch in Megatron's `[sum, count]` convention: `onpolicy logprob gap` is the mean
|difference| over the generated tokens; `onpolicy logprob gap max` carries the micro-batch's max as
`[max, 1]`, so after Megatron-LM sums report entries over micro-batches and data-parallel ranks it reads as
the mean of per-micro-batch maxima (the max itself with one micro-batch per step).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

GAP_KEY = "onpolicy logprob gap"
GAP_MAX_KEY = "onpolicy logprob gap max"


def _gathered_rows(rows: torch.Tensor, group) -> torch.Tensor:
    """[n, V/TP] vocabulary shards -> [n, V] (rank order = Megatron's vocabulary order)."""
    tp = dist.get_world_size(group) if group is not None else 1
    if tp == 1:
        return rows
    parts = [torch.empty_like(rows) for _ in range(tp)]
    dist.all_gather(parts, rows.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def training_logprobs(logits_sbv: torch.Tensor, labels: torch.Tensor, select: torch.Tensor, vocab_size: int,
                      group=None, chunk_rows: int = 512) -> torch.Tensor:
    """Log-probs [n] of `labels` at the positions `select` [b, s] (bool; row-major order) from the training
    forward's output-layer logits [s, b, V/TP], computed as the sampling side computes them."""
    b_idx, s_idx = select.nonzero(as_tuple=True)
    targets = labels[b_idx, s_idx].to(torch.int64)
    out = torch.empty(targets.numel(), dtype=torch.float32, device=logits_sbv.device)
    for lo in range(0, targets.numel(), chunk_rows):
        hi = min(targets.numel(), lo + chunk_rows)
        rows = _gathered_rows(logits_sbv[s_idx[lo:hi], b_idx[lo:hi]], group).float()
        rows[:, vocab_size:] = -math.inf
        out[lo:hi] = torch.log_softmax(rows, dim=-1).gather(1, targets[lo:hi, None]).squeeze(1)
    return out


@torch.no_grad()
def logprob_gap(logits_sbv: torch.Tensor, labels: torch.Tensor, sampling_logprobs: torch.Tensor, vocab_size: int,
                group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, count, max) of |sampling-time - training| log-prob over the tokens that have a sampling-time one
    (finite entries of `sampling_logprobs` [b, s], aligned with `labels` [b, s])."""
    device = logits_sbv.device
    sampled = sampling_logprobs.to(device=device, dtype=torch.float32)
    select = torch.isfinite(sampled)
    trained = training_logprobs(logits_sbv, labels.to(device), select, vocab_size, group)
    diff = (trained - sampled[select]).abs()
    count = torch.tensor(float(diff.numel()), device=device)
    if diff.numel() == 0:
        zero = torch.zeros((), device=device)
        return zero, count, zero
    return diff.sum(), count, diff.max()


def add_logprob_gap(outputs: tuple, logits_sbv: torch.Tensor, batch: Optional[dict], vocab_size: int,
                    group=None) -> tuple:
    """The loss-function result with the gap entries added to its report dict. `batch`: the micro-batch dict,
    or None / a dict without `sampling_logprobs` (an off-policy micro-batch: the entries are zero)."""
    device = logits_sbv.device
    if batch is not None and batch.get("sampling_logprobs") is not None:
        total, count, largest = logprob_gap(logits_sbv, batch["labels"], batch["sampling_logprobs"], vocab_size,
                                            group)
    else:
        total = count = largest = torch.zeros((), device=device)
    report = dict(outputs[-1] or {})
    if len(outputs) == 3:
        report[GAP_KEY] = torch.stack([total, count])
        report[GAP_MAX_KEY] = torch.stack([largest, (count > 0).float()])
    else:  # legacy (loss, report): plain values
        report[GAP_KEY] = total / count.clamp(min=1)
        report[GAP_MAX_KEY] = largest
    return (*outputs[:-1], report)
