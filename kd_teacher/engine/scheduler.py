"""One scheduler that packs score requests into teacher micro-batches up to a token budget.

A request is a [b, s] block of token ids (a student micro-batch, or dataset samples). When the precision
recipe is batch-invariant, sequences from different requests may share a forward: they are sorted by length
and packed greedily so that rows x longest-length stays within `max_tokens`, shorter rows right-padded
(causal attention keeps the padding from reaching earlier positions). When it is not (FP8 per-tensor
current scaling), every request runs exactly as the student gave it, so its logits are the ones its own
training forward would see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class ScoreRequest:
    tokens: torch.Tensor  # [b, s] int64
    sample_ids: Optional[list] = None
    request_id: Optional[str] = None


@dataclass
class PlannedBatch:
    """Which (request, row) pairs one forward computes, and at what padded length."""

    rows: list = field(default_factory=list)  # [(request index, row index, length)]
    seq_len: int = 0

    @property
    def tokens(self) -> int:
        return len(self.rows) * self.seq_len


class TokenBudgetScheduler:
    def __init__(self, max_tokens: int, allow_repacking: bool = True, seq_multiple: int = 1):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.allow_repacking = allow_repacking
        # Forwards are right-padded to a multiple of this (sequence parallelism splits the sequence over TP).
        self.seq_multiple = seq_multiple

    def _padded(self, length: int) -> int:
        return -(-length // self.seq_multiple) * self.seq_multiple

    def plan(self, requests: list[ScoreRequest]) -> list[PlannedBatch]:
        if not self.allow_repacking:
            return [
                PlannedBatch([(i, r, req.tokens.shape[1]) for r in range(req.tokens.shape[0])],
                             self._padded(req.tokens.shape[1]))
                for i, req in enumerate(requests)
            ]
        rows = [(i, r, req.tokens.shape[1]) for i, req in enumerate(requests) for r in range(req.tokens.shape[0])]
        # Longest first: a batch's padded length is its first row's, so little padding is wasted.
        rows.sort(key=lambda x: -x[2])
        batches: list[PlannedBatch] = []
        cur = PlannedBatch()
        for row in rows:
            length = row[2]
            seq_len = max(cur.seq_len, self._padded(length))
            if cur.rows and (len(cur.rows) + 1) * seq_len > self.max_tokens:
                batches.append(cur)
                cur = PlannedBatch()
                seq_len = self._padded(length)
            cur.rows.append(row)
            cur.seq_len = seq_len
        if cur.rows:
            batches.append(cur)
        return batches

    @staticmethod
    def gather_tokens(requests: list[ScoreRequest], batch: PlannedBatch, pad_id: int = 0) -> torch.Tensor:
        first = requests[batch.rows[0][0]].tokens
        if [(i, r) for i, r, _ in batch.rows] == [(batch.rows[0][0], r) for r in range(first.shape[0])] \
                and first.shape[1] == batch.seq_len:
            return first  # one whole request, rows in order, no padding: nothing to copy
        out = torch.full((len(batch.rows), batch.seq_len), pad_id, dtype=torch.long,
                         device=requests[0].tokens.device)
        for j, (i, r, length) in enumerate(batch.rows):
            out[j, :length] = requests[i].tokens[r]
        return out
