"""`OfflineTeacher`: a dump directory served like a live teacher, looked up by the content of each sequence.

    teacher = OfflineTeacher("/dumps/qwen7b-k64", expect={"k": 64, "temperature": 1.0}, missing="error")
    payload = teacher.score(tokens)            # tokens [b, s] -> TopKPayload, as TeacherEngine.score gives

Every row of `tokens` is found by its token hash (BLAKE2b-128 of its ids, the same `token_hash` the payload
header carries), so the student may use any DP/TP/CP layout, micro-batch size, rank count or data order: it
only has to train on sequences the dump saw. A shard's header and tables are checked against the manifest
when the teacher opens it, and every served sample is read into memory of its own and its checksum verified
(`shard.ShardFile`), so a corrupt shard, or one changed or truncated while training reads it, is an error
naming the shard file, never wrong numbers. At most `max_open_shards` files are held open at a time.

Sequences that are not in the dump (`missing=`):
- "error" (default): `score`/`lookup` raise `MissingSamplesError` saying how many rows of the micro-batch
  are missing.
- "ce_only" (the name `kd.offline.missing` uses too): the call succeeds; the caller learns which rows are real from
  the payload's header, `PayloadHeader.present` (`payload.present`, a bool tensor [b]; also
  `lookup(tokens) -> OfflineLookup(payload, present)`). It travels with the payload (`to_bytes`), so a
  tensor-parallel rank that receives the payload by broadcast masks the same rows.
  Missing rows hold a placeholder (a uniform distribution over ids 0..k-1, lse = log k) that is a valid
  payload but not the teacher's: the training hook must drop those rows from the KD term (cross-entropy
  only). `teacher.missing_sequences` / `served_sequences` count them over the teacher's lifetime.

`expect=` (a dict or a `TeacherContract`) names what the training run needs: k, temperature, vocab_size,
teacher_fingerprint, recipe_fingerprint, values_dtype. A dump that differs is a `DumpMismatchError` listing
each difference (`TeacherContract.check`), unless `allow_mismatch=True` (then a warning): the override for a
deliberate choice.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from kd_teacher.config import from_dict
from kd_teacher.contract import TeacherContract, contract_fields
from kd_teacher.dtypes import DTYPES, INDEX_DTYPE
from kd_teacher.offline import format as fmt
from kd_teacher.offline.shard import ShardFile
from kd_teacher.payload import PayloadHeader, TopKPayload, token_hashes


@dataclass
class OfflineLookup:
    payload: TopKPayload
    present: torch.Tensor  # bool [b]: True where the row is the teacher's, False for a placeholder

    @property
    def missing(self) -> int:
        return int((~self.present).sum())


class _HashIndex:
    """Sorted 128-bit keys -> (shard, row), searched with numpy: 24 bytes a sample, not a Python dict."""

    def __init__(self, hashes: np.ndarray, shard: np.ndarray, row: np.ndarray):
        be = hashes.reshape(-1, 2, 8).view(">u8").reshape(-1, 2).astype(np.uint64)
        order = np.lexsort((row, shard, be[:, 1], be[:, 0]))  # duplicates: the first sample wins
        self.hi, self.lo = be[order, 0], be[order, 1]
        self.shard, self.row = shard[order], row[order]

    def find(self, digest: bytes) -> Optional[tuple[int, int]]:
        hi, lo = np.frombuffer(digest, dtype=">u8").astype(np.uint64)
        i = int(np.searchsorted(self.hi, hi, side="left"))
        while i < len(self.hi) and self.hi[i] == hi:
            if self.lo[i] == lo:
                return int(self.shard[i]), int(self.row[i])
            i += 1
        return None


class OfflineTeacher:
    def __init__(
        self,
        directory: str | Path,
        *,
        expect: TeacherContract | dict | None = None,
        missing: Literal["error", "ce_only"] = "error",
        allow_mismatch: bool = False,
        allow_incomplete: bool = False,
        max_open_shards: int = 64,
    ):
        if missing not in ("error", "ce_only"):
            raise ValueError(f"missing must be 'error' or 'ce_only', got {missing!r}")
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        self.max_open_shards = max_open_shards
        self._open_shards: OrderedDict[int, None] = OrderedDict()  # shards holding a file open, oldest first
        self.dir = Path(directory)
        self.missing_mode = missing
        self.manifest = fmt.load_manifest(self.dir)
        if not self.manifest.complete and not allow_incomplete:
            raise fmt.DumpError(
                f"{self.dir} is an unfinished dump ({len(self.manifest.shards)} of {self.manifest.num_shards} shards "
                "in its manifest): finish it by rerunning `kd-teacher dump`, or pass allow_incomplete=True"
            )
        self._check_expectation(expect, allow_mismatch)
        self.shards = {e["index"]: ShardFile(self.dir, e, self.manifest) for e in self.manifest.shards}
        self.index = self._build_index()
        self.missing_sequences = 0
        self.served_sequences = 0

    # ---- what the loss and the hook read -------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.manifest.k

    @property
    def temperature(self) -> float:
        return self.manifest.temperature

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def teacher_fingerprint(self) -> str:
        return self.manifest.teacher_fingerprint

    @property
    def recipe_fingerprint(self) -> str:
        return self.manifest.recipe_fingerprint

    @property
    def values_dtype(self) -> torch.dtype:
        return DTYPES[self.manifest.values_dtype]

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards.values())

    def close(self) -> None:
        """Close every shard file; the teacher serves nothing afterwards."""
        for shard in self.shards.values():
            shard.close()
        self._open_shards.clear()
        self.shards = {}
        self.index = _HashIndex(np.zeros((0, 16), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))

    def __enter__(self) -> "OfflineTeacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- opening ---------------------------------------------------------------------------------------------
    def _check_expectation(self, expect, allow_mismatch: bool) -> None:
        if expect is None:
            return
        if isinstance(expect, dict):
            expect = from_dict(TeacherContract, expect, "expect")
        self.manifest.check(expect, served="the dump", expecting="this training run", error=fmt.DumpMismatchError,
                            accept=contract_fields() if allow_mismatch else (),
                            remedy=f"The dump: {self.dir}; pass allow_mismatch=True to use it deliberately")

    def _build_index(self) -> _HashIndex:
        hashes, shard, row = [], [], []
        for i, s in self.shards.items():
            n = len(s)
            hashes.append(s.tables["token_hashes"].numpy())
            shard.append(np.full(n, i, dtype=np.int64))
            row.append(np.arange(n, dtype=np.int64))
        if not hashes:
            return _HashIndex(np.zeros((0, 16), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return _HashIndex(np.concatenate(hashes), np.concatenate(shard), np.concatenate(row))

    def _read(self, shard: int, row: int):
        """`ShardFile.read`, keeping at most `max_open_shards` files open (the least recently read is closed)."""
        try:
            return self.shards[shard].read(row)
        finally:
            self._open_shards[shard] = None
            self._open_shards.move_to_end(shard)
            while len(self._open_shards) > self.max_open_shards:
                self.shards[self._open_shards.popitem(last=False)[0]].close()

    # ---- serving ----------------------------------------------------------------------------------------------
    def lookup(
        self, tokens: torch.Tensor, *, sample_ids: Optional[Sequence[int]] = None, request_id: Optional[str] = None
    ) -> OfflineLookup:
        """Payload rows for every sequence of `tokens` [b, s] found in the dump, and which were found."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.numel() == 0:
            raise fmt.DumpError(f"tokens must be a non-empty [batch, seq] tensor, got {getattr(tokens, 'shape', tokens)}")
        b, s = tokens.shape
        k = self.k
        hashes = token_hashes(tokens)
        # Placeholder rows: a uniform distribution over ids 0..k-1 (equal logits; for a sampled dump one draw each)
        values = (torch.ones if self.manifest.extraction == "sampled" else torch.zeros)(b, s, k, dtype=self.values_dtype)
        indices = torch.arange(k, dtype=INDEX_DTYPE).expand(b, s, k).clone()
        lse = torch.full((b, s), math.log(k), dtype=torch.float32)
        present = torch.zeros(b, dtype=torch.bool)
        for r, h in enumerate(hashes):
            where = self.index.find(bytes.fromhex(h))
            if where is None:
                continue
            v, ids, l_ = self._read(*where)
            if v.shape[0] != s:
                raise fmt.ShardCorruptError(
                    f"shard {self.shards[where[0]].path}: row {where[1]} has {v.shape[0]} positions for a "
                    f"{s}-token sequence with its hash"
                )
            values[r], indices[r], lse[r] = v, ids, l_
            present[r] = True
        n_missing = b - int(present.sum())
        self.missing_sequences += n_missing
        self.served_sequences += b - n_missing
        if n_missing and self.missing_mode == "error":
            raise fmt.MissingSamplesError(
                f"{n_missing} of {b} sequences of this micro-batch are not in the offline dump {self.dir} "
                f"({len(self)} samples): was it dumped from this dataset (seq length, split, seed, blend)? "
                "Use missing='ce_only' (kd.offline.missing: ce_only) to train those on cross-entropy only"
            )
        header = PayloadHeader(
            **vars(self.manifest.contract()), batch=b, seq_len=s, token_hashes=hashes,
            sample_ids=None if sample_ids is None else [int(i) for i in sample_ids], request_id=request_id,
            present=present.tolist() if self.missing_mode == "ce_only" else None,
        )
        payload = TopKPayload(values, indices, lse, header).to(tokens.device)
        return OfflineLookup(payload, present.to(tokens.device))

    def score(
        self, tokens: torch.Tensor, *, sample_ids: Optional[Sequence[int]] = None, request_id: Optional[str] = None
    ) -> TopKPayload:
        """Same contract as `TeacherEngine.score`; with missing='ce_only' the header says which rows are present."""
        return self.lookup(tokens, sample_ids=sample_ids, request_id=request_id).payload
