"""`TopKPayload`: the teacher's top-k logits for a micro-batch, with a header the receiver checks.

Per token: `k` raw teacher logits (`values`, before temperature), their global vocabulary ids (`indices`) and
the float32 log-sum-exp of logits / T over the true vocabulary (`lse`). The teacher's log-prob at temperature
T of a served id is `values / T - lse`, and the mass outside the top-k is exact: 1 - sum(exp(logp)).

The header's `extraction` says how the ids were chosen. "topk" is the above. "sampled" (schema version 2,
`kd_teacher.sampling`): the teacher drew k ids per token from its distribution at T, with replacement; `values`
then hold how many of the k draws fell on each id (counts summing to k, an unbiased estimate k * p of the
teacher's probabilities; in the logits' dtype where it holds 0..k exactly, else fp32), the ids are the distinct
drawn ids followed by count-0 fillers, and `lse` is the same log-sum-exp. Readers of this version read version-1
payloads (all top-k) unchanged.

Wire form (`to_bytes`): magic, a JSON header, the three raw tensor buffers, and a 16-byte BLAKE2b digest of
everything before it. No pickle: a reader parses JSON and copies raw bytes, and checks sizes against the
header before it allocates anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Sequence

import torch

from kd_teacher.contract import TeacherContract
from kd_teacher.dtypes import DTYPE_NAMES, DTYPES, INDEX_DTYPE

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)  # 1: before the sampled kind; its payloads are all top-k
EXTRACTIONS = ("topk", "sampled")
# Largest integer up to which every integer is exact in each values dtype (draw counts of sampled payloads).
EXACT_COUNTS = {"float32": 2**24, "bfloat16": 2**8, "float16": 2**11}
MAGIC = b"KDTP"
_DIGEST_BYTES = 16
_MAX_HEADER_BYTES = 64 << 20


class PayloadError(ValueError):
    """A payload is malformed, corrupt, or does not fit what the receiver expects."""


class TokenMismatchError(PayloadError):
    """The payload was computed for other tokens than the ones it is being used with."""


def check_token_ids(tokens: torch.Tensor) -> None:
    """Token ids must be integers: a float id would be truncated to another id (3.4 -> 3) when cast, then hashed,
    looked up or scored as that one. Every place ids enter calls this before it casts them."""
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise PayloadError(f"token ids must be integers, got {tokens.dtype}")


def token_hash(tokens: torch.Tensor) -> str:
    """128-bit BLAKE2b of one sequence's token ids (as little-endian int64), hex."""
    check_token_ids(tokens)
    t = tokens.detach().reshape(-1).to(device="cpu", dtype=torch.int64).contiguous()
    return hashlib.blake2b(t.numpy().tobytes(), digest_size=16).hexdigest()


def token_hashes(tokens: torch.Tensor) -> list[str]:
    """One hash per sequence of a [b, s] batch."""
    if tokens.dim() != 2:
        raise PayloadError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    check_token_ids(tokens)
    host = tokens.detach().to(device="cpu", dtype=torch.int64).contiguous()  # one device-to-host copy
    # token_hash of each row, hashing the rows in place (no per-row tensor or bytes copy)
    return [hashlib.blake2b(row, digest_size=16).hexdigest() for row in host.numpy()]


def parse_json(text, error: type[Exception], what: str):
    """json.loads of a header that came from outside: anything malformed (bytes that are not UTF-8 or not JSON,
    nesting too deep for the parser) is `error` naming `what`, never another exception type."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{what} is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None


@dataclass(kw_only=True)
class PayloadHeader(TeacherContract):
    """What a receiver needs to check before it uses a payload (and to size buffers before allocating): what the
    teacher serves (`TeacherContract`, checked against the receiver's expectation with `check(expected)`) and
    this payload's own shape, tokens and ids."""

    k: int
    temperature: float
    vocab_size: int
    values_dtype: str = "float32"
    extraction: str = "topk"
    batch: int
    seq_len: int
    token_hashes: list = field(default_factory=list)
    sample_ids: Optional[list] = None
    request_id: Optional[str] = None
    # Per sequence: does it carry the teacher's numbers? False: a placeholder (an offline dump lacked the
    # sequence, `missing: ce_only`) that the loss must not distil toward. None: every sequence does.
    present: Optional[list] = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_json(cls, text: str | bytes) -> "PayloadHeader":
        return cls.from_dict(parse_json(text, PayloadError, "payload header"))

    @classmethod
    def from_dict(cls, data) -> "PayloadHeader":
        """`from_json` of an already parsed JSON object (a transport's message header embeds it)."""
        if not isinstance(data, dict):
            raise PayloadError("payload header is not a JSON object")
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise PayloadError(
                f"payload schema version {version!r} is not understood (this reader: {READABLE_SCHEMA_VERSIONS})"
            )
        if version == 1 and data.get("extraction", "topk") != "topk":
            raise PayloadError(f"a version-1 payload is top-k, but this one says extraction {data['extraction']!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        missing = {"k", "temperature", "vocab_size", "batch", "seq_len"} - set(data)
        if unknown or missing:
            raise PayloadError(f"payload header has unknown fields {sorted(unknown)} / lacks {sorted(missing)}")
        header = cls(**data)
        header.validate()
        return header

    def validate(self) -> None:
        """Bounds and types of the header alone (before any buffer is sized from it)."""
        for name in ("k", "vocab_size", "batch", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise PayloadError(f"payload header field {name}={v!r} is not a non-negative integer")
        if self.k < 1:
            raise PayloadError(f"payload k={self.k} must be >= 1")
        if self.k > self.vocab_size:
            raise PayloadError(f"payload k={self.k} is larger than its vocab size {self.vocab_size}")
        if self.vocab_size >= 2**31:
            raise PayloadError(f"payload vocab size {self.vocab_size} does not fit int32 ids")
        if not isinstance(self.temperature, (int, float)) or not (0 < self.temperature < math.inf):
            raise PayloadError(f"payload temperature {self.temperature!r} is not a positive finite number")
        if not isinstance(self.values_dtype, str) or self.values_dtype not in DTYPES:
            raise PayloadError(f"payload values dtype {self.values_dtype!r:.80} is not one of {sorted(DTYPES)}")
        # The types a JSON header could get wrong, refused here rather than as a TypeError further on.
        for name in ("extraction", "teacher_fingerprint", "recipe_fingerprint", "request_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise PayloadError(f"payload header field {name}={value!r:.80} is not a string")
        if not isinstance(self.token_hashes, list) or not all(isinstance(h, str) for h in self.token_hashes):
            raise PayloadError(f"payload token hashes {self.token_hashes!r:.80} are not a list of strings")
        if self.extraction not in EXTRACTIONS:
            raise PayloadError(f"payload extraction {self.extraction!r:.80} is not one of {list(EXTRACTIONS)}")
        if self.extraction == "sampled" and self.k > EXACT_COUNTS[self.values_dtype]:
            raise PayloadError(f"a sampled payload's values are draw counts up to k={self.k}: {self.values_dtype} "
                               f"holds integers exactly only up to {EXACT_COUNTS[self.values_dtype]}")
        if len(self.token_hashes) not in (0, self.batch):
            raise PayloadError(f"payload has {len(self.token_hashes)} token hashes for {self.batch} sequences")
        if self.sample_ids is not None and (
                not isinstance(self.sample_ids, list)
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.sample_ids)):
            raise PayloadError(f"payload sample ids {self.sample_ids!r:.80} are not a list of integers")
        if self.sample_ids is not None and len(self.sample_ids) != self.batch:
            raise PayloadError(f"payload has {len(self.sample_ids)} sample ids for {self.batch} sequences")
        if self.present is not None and (len(self.present) != self.batch
                                         or not all(isinstance(p, bool) for p in self.present)):
            raise PayloadError(f"payload 'present' must be {self.batch} true/false values, got {self.present!r:.80}")

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def buffer_sizes(self) -> tuple[int, int, int]:
        """Bytes of values, indices and lse implied by the header."""
        n = self.batch * self.seq_len
        item = DTYPES[self.values_dtype].itemsize
        return n * self.k * item, n * self.k * 4, n * 4


@dataclass
class TopKPayload:
    """values [b, s, k] (raw logits), indices [b, s, k] int32 global ids, lse [b, s] fp32 of logits / T."""

    values: torch.Tensor
    indices: torch.Tensor
    lse: torch.Tensor
    header: PayloadHeader

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_logits(
        cls,
        logits: torch.Tensor,
        k: int,
        *,
        temperature: float = 1.0,
        vocab_size: Optional[int] = None,
        tokens: Optional[torch.Tensor] = None,
        group=None,
        sample_ids: Optional[Sequence[int]] = None,
        request_id: Optional[str] = None,
        teacher_fingerprint: str = "",
        recipe_fingerprint: str = "",
        extraction: str = "topk",
        sample_seed: int = 0,
    ) -> "TopKPayload":
        """Payload from logits [b, s, V] (or this rank's vocabulary shard [b, s, V/TP] with the TP `group`).

        extraction="sampled": k draws per token (`kd_teacher.sampling`), seeded by the hashes of `tokens` (then
        required), the positions and `sample_seed`."""
        from kd_teacher.sampling import token_seeds, vocab_parallel_sample
        from kd_teacher.topk import check_finite_lse, vocab_parallel_topk

        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise PayloadError(f"logits must be a [batch, seq, vocab] tensor, got {_shape_or_type(logits)}")
        if logits.dtype not in DTYPE_NAMES:
            raise PayloadError(
                f"logits of dtype {logits.dtype} cannot be served: payload values are stored as "
                f"{', '.join(DTYPES)} (the logits' own dtype, bit for bit); cast them first, e.g. logits.float()"
            )
        if logits.shape[0] == 0 or logits.shape[1] == 0:
            raise PayloadError(f"empty batch: logits shape {tuple(logits.shape)}")
        if extraction not in EXTRACTIONS:
            raise PayloadError(f"extraction {extraction!r} is not one of {list(EXTRACTIONS)}")
        b, s = logits.shape[:2]
        hashes = []
        if tokens is not None:
            if tuple(tokens.shape) != (b, s):
                raise PayloadError(f"tokens shape {tuple(tokens.shape)} does not match logits [{b}, {s}]")
            hashes = token_hashes(tokens)
        if extraction == "topk":
            values, indices, lse = vocab_parallel_topk(
                logits, k, temperature=temperature, vocab_size=vocab_size, group=group
            )
        else:
            if not hashes:
                raise PayloadError("a sampled payload's draws are seeded by the token hashes: pass tokens=")
            seeds = token_seeds(hashes, s, sample_seed, device=logits.device)
            values, indices, lse = vocab_parallel_sample(
                logits, k, seeds, temperature=temperature, vocab_size=vocab_size, group=group
            )
            check_finite_lse([lse])
            values = values.to(counts_dtype(logits.dtype, k))
        if vocab_size is None:
            tp = torch.distributed.get_world_size(group) if group is not None else 1
            vocab_size = logits.shape[-1] * tp
        header = PayloadHeader(
            k=k,
            temperature=float(temperature),
            vocab_size=int(vocab_size),
            batch=b,
            seq_len=s,
            values_dtype=DTYPE_NAMES[values.dtype],
            token_hashes=hashes,
            sample_ids=None if sample_ids is None else [int(i) for i in sample_ids],
            request_id=request_id,
            teacher_fingerprint=teacher_fingerprint,
            recipe_fingerprint=recipe_fingerprint,
            extraction=extraction,
        )
        return cls(values=values, indices=indices.to(INDEX_DTYPE), lse=lse, header=header)

    # ---- what the loss reads --------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.header.k

    @property
    def temperature(self) -> float:
        return self.header.temperature

    @property
    def present(self) -> Optional[torch.Tensor]:
        """bool [b]: which sequences carry the teacher's numbers (`PayloadHeader.present`); None: all."""
        return None if self.header.present is None else torch.tensor(self.header.present, dtype=torch.bool)

    @property
    def sampled(self) -> bool:
        return self.header.extraction == "sampled"

    def log_probs(self) -> torch.Tensor:
        """Teacher log-probs at the recorded temperature of the k served ids, fp32 [b, s, k] (top-k payloads)."""
        if self.sampled:
            raise PayloadError("a sampled payload carries draw counts, not the teacher's logits: its log-probs at "
                               "the ids are unknown (estimated_probs() is the unbiased estimate of the probabilities)")
        return self.values.float() / self.header.temperature - self.lse.unsqueeze(-1)

    def estimated_probs(self) -> torch.Tensor:
        """Sampled payloads: count / k, fp32 [b, s, k], an unbiased estimate of the teacher's probability of each
        slot's id at the recorded temperature."""
        if not self.sampled:
            raise PayloadError("estimated_probs() is for sampled payloads; a top-k payload has exact log_probs()")
        return self.values.float() / self.header.k

    # ---- checks ----------------------------------------------------------------------------------------
    def validate(self, values: bool = True) -> "TopKPayload":
        """Shapes, dtypes, index range, k and finiteness; raises PayloadError naming the problem.

        values=False checks the header, shapes and dtypes alone: no tensor is read, so on a GPU the host does
        not wait for it (the KD loss checks the values with one read of its own, `kd_teacher.losses.kd`)."""
        h = self.header
        h.validate()
        b, s, k = h.batch, h.seq_len, h.k
        if tuple(self.values.shape) != (b, s, k):
            raise PayloadError(f"values shape {tuple(self.values.shape)} != header [batch, seq, k] = {[b, s, k]}")
        if tuple(self.indices.shape) != (b, s, k):
            raise PayloadError(f"indices shape {tuple(self.indices.shape)} != {[b, s, k]}")
        if tuple(self.lse.shape) != (b, s):
            raise PayloadError(f"lse shape {tuple(self.lse.shape)} != {[b, s]}")
        if self.values.dtype != DTYPES[h.values_dtype]:
            raise PayloadError(f"values dtype {self.values.dtype} != header {h.values_dtype}")
        if self.indices.dtype != INDEX_DTYPE:
            raise PayloadError(f"indices dtype {self.indices.dtype} != int32")
        if self.lse.dtype != torch.float32:
            raise PayloadError(f"lse dtype {self.lse.dtype} != float32")
        if not values:
            return self
        if not self.values.numel():
            return self
        # Every value check in one reduction and one read: on a GPU each separate check would hold the host
        # until the queued work is done (float64 keeps int32 ids exact).
        lo, hi, finite, excess = torch.stack([
            self.indices.min().double(), self.indices.max().double(),
            (torch.isfinite(self.values).all() & torch.isfinite(self.lse).all()).double(),
            # top-k: log-sum-exp bounds every served logit from above: catches an lse paired with other values.
            # sampled: 1 where the counts are not k non-negative integers per token.
            bad_counts(self.values, k).double() if self.sampled else
            (self.values.float() / h.temperature - self.lse.unsqueeze(-1)).max().double(),
        ]).tolist()
        if lo < 0 or hi >= h.vocab_size:
            raise PayloadError(f"indices range [{int(lo)}, {int(hi)}] outside the vocabulary [0, {h.vocab_size})")
        if not finite:
            raise PayloadError("payload has non-finite values or lse")
        if self.sampled and excess:
            raise PayloadError(f"sampled payload values are not draw counts: each token's must be non-negative "
                               f"integers summing to k={k}")
        if not self.sampled and excess > 1e-3:
            raise PayloadError(f"lse is smaller than a served logit / T by {excess:.3g}: values and lse disagree")
        return self

    def check_tokens(self, tokens: torch.Tensor, sample_ids: Optional[Sequence[int]] = None) -> None:
        """Raise TokenMismatchError unless this payload was computed for exactly `tokens` [b, s]."""
        self._check_shape(tuple(tokens.shape))  # before hashing: a batch of another shape is not hashed
        self.check_token_hashes(tuple(tokens.shape), token_hashes(tokens), sample_ids)

    def check_token_hashes(self, shape: tuple, hashes: list, sample_ids: Optional[Sequence[int]] = None) -> None:
        """`check_tokens` for tokens of `shape` whose `token_hashes` were already computed (a streaming client
        hashes its request once, when it sends it)."""
        self._check_shape(shape)
        if hashes != self.header.token_hashes:
            bad = [i for i, (a, b) in enumerate(zip(hashes, self.header.token_hashes)) if a != b]
            raise TokenMismatchError(
                f"payload belongs to other tokens: {len(bad)} of {len(hashes)} sequences differ (first: row {bad[0]})"
            )
        if sample_ids is not None and self.header.sample_ids is not None:
            if [int(i) for i in sample_ids] != list(self.header.sample_ids):
                raise TokenMismatchError(
                    f"payload sample ids {self.header.sample_ids} != micro-batch sample ids {list(sample_ids)}"
                )

    def _check_shape(self, shape: tuple) -> None:
        if shape != (self.header.batch, self.header.seq_len):
            raise TokenMismatchError(
                f"payload is for [batch, seq] = [{self.header.batch}, {self.header.seq_len}] "
                f"but the micro-batch is {list(shape)}"
            )
        if not self.header.token_hashes:
            raise TokenMismatchError("payload carries no token hashes, so it cannot be matched to the micro-batch")

    # ---- reshaping -------------------------------------------------------------------------------------
    def rows(self, rows: Sequence[int]) -> "TopKPayload":
        """The payload of a subset of the sequences, in the given order."""
        bad = [r for r in rows if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < self.header.batch]
        if bad:
            raise PayloadError(f"rows {bad[:5]} are not sequence indices of a payload of {self.header.batch} sequences")
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.values.device)
        h = self.header
        header = replace(
            h,
            batch=len(rows),
            token_hashes=[h.token_hashes[i] for i in rows] if h.token_hashes else [],
            sample_ids=[h.sample_ids[i] for i in rows] if h.sample_ids is not None else None,
            present=[h.present[i] for i in rows] if h.present is not None else None,
        )
        return TopKPayload(self.values[idx], self.indices[idx], self.lse[idx], header)

    @staticmethod
    def cat(parts: Sequence["TopKPayload"]) -> "TopKPayload":
        """Concatenate payloads of the same teacher/k/T/length along the batch dimension."""
        if not parts:
            raise PayloadError("cannot concatenate an empty list of payloads")
        h0 = parts[0].header
        for i, p in enumerate(parts[1:], 1):
            if p.header.seq_len != h0.seq_len:
                raise PayloadError(f"cannot concatenate payloads of lengths {h0.seq_len} and {p.header.seq_len}")
            p.header.check(h0, served=f"payload {i}", expecting="payload 0", error=PayloadError)
        ids = None
        if all(p.header.sample_ids is not None for p in parts):
            ids = [i for p in parts for i in p.header.sample_ids]
        hashes = [x for p in parts for x in p.header.token_hashes]
        present = None
        if any(p.header.present is not None for p in parts):
            present = [x for p in parts for x in (p.header.present or [True] * p.header.batch)]
        header = replace(h0, batch=sum(p.header.batch for p in parts), sample_ids=ids,
                         token_hashes=hashes if all(p.header.token_hashes for p in parts) else [],
                         request_id=None, present=present)
        return TopKPayload(
            torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts]),
            torch.cat([p.lse for p in parts]), header,
        )

    def to(self, device, non_blocking: bool = False) -> "TopKPayload":
        return TopKPayload(self.values.to(device, non_blocking=non_blocking),
                           self.indices.to(device, non_blocking=non_blocking),
                           self.lse.to(device, non_blocking=non_blocking), self.header)

    def pin_memory(self) -> "TopKPayload":
        """In page-locked host memory, so that `to(cuda, non_blocking=True)` does not hold the host."""
        if self.values.is_cuda or not torch.cuda.is_available():
            return self
        return TopKPayload(self.values.pin_memory(), self.indices.pin_memory(), self.lse.pin_memory(), self.header)

    # ---- serialisation ---------------------------------------------------------------------------------
    def to_tensors(self) -> tuple[dict[str, torch.Tensor], str]:
        """Plain tensors and the header as JSON (e.g. for safetensors, whose metadata is str -> str)."""
        return {"values": self.values, "indices": self.indices, "lse": self.lse}, self.header.to_json()

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], header_json: str) -> "TopKPayload":
        missing = {"values", "indices", "lse"} - set(tensors)
        if missing:
            raise PayloadError(f"payload tensors lack {sorted(missing)}")
        header = PayloadHeader.from_json(header_json)
        return cls(tensors["values"], tensors["indices"], tensors["lse"], header).validate()

    def to_bytes(self) -> bytes:
        header = self.header.to_json().encode()
        parts = [
            MAGIC,
            struct.pack("<Q", len(header)),
            header,
            _raw_bytes(self.values),
            _raw_bytes(self.indices),
            _raw_bytes(self.lse),
        ]
        body = b"".join(parts)
        return body + hashlib.blake2b(body, digest_size=_DIGEST_BYTES).digest()

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> "TopKPayload":
        buf = memoryview(buf).cast("B")
        if len(buf) < 12 + _DIGEST_BYTES or bytes(buf[:4]) != MAGIC:
            raise PayloadError("not a kd-teacher payload (bad magic or too short)")
        (hlen,) = struct.unpack("<Q", buf[4:12])
        if hlen > _MAX_HEADER_BYTES or 12 + hlen + _DIGEST_BYTES > len(buf):
            raise PayloadError(f"payload header length {hlen} is absurd for a {len(buf)}-byte message")
        header = PayloadHeader.from_json(bytes(buf[12 : 12 + hlen]))
        nv, ni, nl = header.buffer_sizes()
        start = 12 + hlen
        if start + nv + ni + nl + _DIGEST_BYTES != len(buf):
            raise PayloadError(
                f"payload is {len(buf)} bytes but its header implies {start + nv + ni + nl + _DIGEST_BYTES}"
            )
        body_end = len(buf) - _DIGEST_BYTES
        digest = hashlib.blake2b(buf[:body_end], digest_size=_DIGEST_BYTES).digest()
        if digest != bytes(buf[body_end:]):
            raise PayloadError("payload checksum mismatch: the header or data were altered or corrupted")
        b, s, k = header.batch, header.seq_len, header.k
        values = _from_raw(buf[start : start + nv], DTYPES[header.values_dtype], (b, s, k))
        indices = _from_raw(buf[start + nv : start + nv + ni], INDEX_DTYPE, (b, s, k))
        lse = _from_raw(buf[start + nv + ni : body_end], torch.float32, (b, s))
        return cls(values, indices, lse, header).validate()


def _shape_or_type(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def bad_counts(values: torch.Tensor, k: int) -> torch.Tensor:
    """0-d bool: some token's values are not non-negative integers summing to k (what a sampled payload holds;
    the sum of k <= 2^24 integers is exact in float32)."""
    v = values.float()
    return (v < 0).any() | (v != v.round()).any() | (v.sum(dim=-1) != k).any()


def counts_dtype(logits_dtype: torch.dtype, k: int) -> torch.dtype:
    """The values dtype of a sampled payload: the logits' own (as a top-k payload's, so that both cost the same
    bytes per slot) where it holds the counts 0..k exactly, else float32."""
    name = DTYPE_NAMES.get(logits_dtype)
    return logits_dtype if name is not None and k <= EXACT_COUNTS[name] else torch.float32


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _from_raw(buf: memoryview, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if len(buf) == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray copy: frombuffer needs a writable buffer to give a tensor we may later modify
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype).reshape(shape)
