"""One scheduler that packs score requests into teacher micro-batches up to a token budget.

A request is a [b, s] block of token ids (a student micro-batch, or dataset samples). Three modes, as the
serving policy decides (`kd_teacher.precision`, `engine.repacking`):

  off     every request runs exactly as the student gave it, so its logits are the ones its own training
          forward would see
  any     sequences from different requests share forwards: sorted by length and packed greedily so that
          rows x longest-length stays within `max_tokens`, shorter rows right-padded (causal attention keeps
          the padding from reaching earlier positions)
  proven  as `any`, but a forward is only formed in a shape that a measured table (`engine.invariance`)
          proves bitwise equal to scoring each of its rows alone, and only for rows whose own micro-batch
          shape is proven too (so packed == alone == as given); everything else runs as given

Every forward is right-padded to a multiple of `seq_multiple` (sequence parallelism) in every mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from kd_teacher.precision import REPACKING_MODES


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
    def __init__(self, max_tokens: int, repacking: str = "off", seq_multiple: int = 1, proven=None):
        """`proven`: for `repacking="proven"`, an `engine.invariance.ProvenShapes` (anything with
        `allows(seq_len, rows, padded_len)`)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if repacking not in REPACKING_MODES:
            raise ValueError(f"repacking must be one of {', '.join(REPACKING_MODES)}, got {repacking!r}")
        if repacking == "proven" and proven is None:
            raise ValueError("repacking=proven needs the proven shapes (engine.invariance_table)")
        self.max_tokens = max_tokens
        self.repacking = repacking
        self.proven = proven
        # Forwards are right-padded to a multiple of this (sequence parallelism splits the sequence over TP).
        self.seq_multiple = seq_multiple

    def _padded(self, length: int) -> int:
        return -(-length // self.seq_multiple) * self.seq_multiple

    def plan(self, requests: list[ScoreRequest]) -> list[PlannedBatch]:
        if self.repacking == "off":
            return [self._as_given(i, req) for i, req in enumerate(requests)]
        if self.repacking == "any":
            rows = [(i, r, req.tokens.shape[1]) for i, req in enumerate(requests) for r in range(req.tokens.shape[0])]
            return self._pack(rows)
        packable, batches = [], []
        for i, req in enumerate(requests):
            b, s = req.tokens.shape
            # Packed == alone (the table) and alone == as given (its own shape in the table, and a lone row's)
            if self.proven.allows(s, b, self._padded(s)) and self.proven.allows(s, 1, self._padded(s)):
                packable += [(i, r, s) for r in range(b)]
            else:
                batches.append(self._as_given(i, req))
        return self._pack(packable, self._proven_prefix) + batches

    def _as_given(self, i: int, req: ScoreRequest) -> PlannedBatch:
        return PlannedBatch([(i, r, req.tokens.shape[1]) for r in range(req.tokens.shape[0])],
                            self._padded(req.tokens.shape[1]))

    def _pack(self, rows: list, fit=None) -> list[PlannedBatch]:
        """Greedy packing of (request, row, length) rows within the budget; `fit(batch)` -> how many of a full
        batch's first rows may form a forward (the rest go back to be packed again)."""
        # Longest first: a batch's padded length is its first row's, so little padding is wasted.
        rows = sorted(rows, key=lambda x: -x[2])
        batches: list[PlannedBatch] = []
        while rows:
            cur = PlannedBatch(seq_len=self._padded(rows[0][2]))
            for row in rows:
                if cur.rows and (len(cur.rows) + 1) * cur.seq_len > self.max_tokens:
                    break
                cur.rows.append(row)
            if fit is not None:
                cur.rows = cur.rows[:fit(cur)]
            batches.append(cur)
            rows = rows[len(cur.rows):]
        return batches

    def _proven_prefix(self, batch: PlannedBatch) -> int:
        """The most leading rows of `batch` whose forward shape the table proves for every one of them (>= 1: a
        lone row was checked when its request was taken as packable)."""
        for n in range(len(batch.rows), 1, -1):
            if all(self.proven.allows(length, n, batch.seq_len) for _, _, length in batch.rows[:n]):
                return n
        return 1

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
