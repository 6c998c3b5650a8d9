"""The streaming teacher's wire protocol: errors, message framing, the connect-time handshake, request and
reply headers. Shared by the torch.distributed and the shared-memory transports.

A message is `MAGIC | u32 header length | JSON header | raw buffers`, the header listing each buffer's byte
length. No pickle: the reader parses JSON, checks every size against its limits and against what it expects
(the request it sent, the k / vocabulary / temperature agreed at connect), and only then allocates.

Errors a student sees (all `TransportError`, a RuntimeError):
  TeacherUnavailableError   the teacher died, hung, restarted or cannot be reached: no payload for this request
    TeacherTimeoutError       no reply within the configured timeout (a subclass: the teacher looked alive)
  IncompatibleTeacherError  at connect: the teacher serves another vocabulary / k / temperature / fingerprint
  RequestRejectedError      the teacher answered this request with an error (bad tokens, too large)
  ProtocolError             a malformed or unexpected message (the channel is unusable afterwards)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from kd_teacher.contract import TeacherContract
from kd_teacher.dtypes import DTYPES, INDEX_DTYPE
from kd_teacher.payload import PayloadError, PayloadHeader, TopKPayload, parse_json

PROTOCOL_VERSION = 2  # 2: torch.distributed requests in one message, binary reply blocks
MAGIC = b"KDTM"
_PREFIX = struct.Struct("<4sI")
MAX_HEADER_BYTES = 1 << 20  # a reply header carries one 32-char hash per sequence: 1 MiB is ~20k sequences
TOKEN_DTYPE = torch.int64


class TransportError(RuntimeError):
    """Base of every error of the streaming transport."""


class TeacherUnavailableError(TransportError):
    """The teacher died, hung, restarted or cannot be reached; the request has no payload."""


class TeacherTimeoutError(TeacherUnavailableError):
    """No reply came within the configured timeout."""


class IncompatibleTeacherError(TransportError):
    """Refused at connect: the teacher serves another vocabulary, k, temperature or fingerprint."""


class RequestRejectedError(TransportError):
    """The teacher answered the request with an error (out-of-range tokens, too many tokens, ...)."""


class ProtocolError(TransportError):
    """A malformed or unexpected message."""


# ---- framing ----------------------------------------------------------------------------------------------------
def encode(header: dict, buffers: Sequence[bytes | memoryview | torch.Tensor] = ()) -> bytes:
    """One message: the JSON header (with the buffer sizes added) followed by the raw buffers."""
    raw = [_as_bytes(b) for b in buffers]
    header = dict(header, buffers=[len(b) for b in raw])
    text = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_PREFIX.pack(MAGIC, len(text)), text, *raw])


def decode(buf: bytes | bytearray | memoryview, max_bytes: int) -> tuple[dict, list[memoryview]]:
    """Header and buffer views of one message; every length is checked before anything is sliced."""
    view = memoryview(buf).cast("B")
    if len(view) > max_bytes:
        raise ProtocolError(f"message of {len(view)} bytes exceeds the limit of {max_bytes}")
    if len(view) < _PREFIX.size:
        raise ProtocolError(f"message of {len(view)} bytes is shorter than its prefix")
    magic, hlen = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise ProtocolError(f"not a kd-teacher message (magic {magic!r})")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(view):
        raise ProtocolError(f"message header length {hlen} is absurd for a {len(view)}-byte message")
    header = parse_json(bytes(view[_PREFIX.size:_PREFIX.size + hlen]), ProtocolError, "message header")
    if not isinstance(header, dict) or not isinstance(header.get("buffers"), list):
        raise ProtocolError("message header is not a JSON object with a 'buffers' list")
    sizes = header["buffers"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
        raise ProtocolError(f"message buffer sizes {sizes!r} are not non-negative integers")
    pos = _PREFIX.size + hlen
    if pos + sum(sizes) != len(view):
        raise ProtocolError(f"message is {len(view)} bytes but its header implies {pos + sum(sizes)}")
    out = []
    for n in sizes:
        out.append(view[pos:pos + n])
        pos += n
    return header, out


def _as_bytes(b) -> bytes | memoryview:
    if isinstance(b, torch.Tensor):
        t = b.detach().to("cpu").contiguous()
        return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return b


def tensor_from(buf: memoryview, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor owning a copy of `buf` (the source may be a shared-memory slot that is about to be reused)."""
    expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if len(buf) != expected:
        raise ProtocolError(f"buffer of {len(buf)} bytes for a {list(shape)} {dtype} tensor ({expected} bytes)")
    if expected == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype).reshape(tuple(shape))


# ---- handshake --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ServerInfo(TeacherContract):
    """What a teacher server announces at connect: what it serves (`TeacherContract`, which students check
    against theirs with `incompatibilities`) and the limits of its requests."""

    vocab_size: int
    k: int
    temperature: float
    values_dtype: str
    teacher_fingerprint: str
    recipe_fingerprint: str
    replicas: int = 1
    max_tokens_per_request: int = 16384
    max_seq_len: int = 4096
    protocol_version: int = PROTOCOL_VERSION

    @classmethod
    def from_json(cls, text: str | bytes) -> "ServerInfo":
        info = cls.from_mapping(parse_json(text, ProtocolError, "teacher server info"), ProtocolError,
                                "teacher server info")
        if info.values_dtype not in DTYPES:  # sizes every reply buffer
            raise ProtocolError(f"teacher server info: values dtype {info.values_dtype!r} is not one of {list(DTYPES)}")
        return info


def student_expectation(hello: dict) -> TeacherContract:
    """The expectation a student's hello carries (`TeacherContract.to_json` of it)."""
    return TeacherContract.from_mapping(hello.get("expect"), ProtocolError, "student expectation")


def incompatibilities(server: ServerInfo, expect: TeacherContract) -> list[str]:
    """Why this server cannot serve this student (empty: it can). Both sides run it at connect."""
    problems = []
    if server.protocol_version != PROTOCOL_VERSION:
        problems.append(f"protocol version {server.protocol_version} != {PROTOCOL_VERSION}")
    return problems + server.mismatches(expect, served="the teacher", expecting="the student")


# ---- requests ---------------------------------------------------------------------------------------------------
@dataclass
class Request:
    """One student micro-batch to score, as the server sees it after decoding."""

    student: int
    seq: int
    tokens: torch.Tensor  # [b, s] int64, CPU
    sample_ids: Optional[list] = None
    request_id: Optional[str] = None


def encode_request(student: int, seq: int, tokens: torch.Tensor, sample_ids=None, request_id=None) -> bytes:
    header = {"type": "request", "student": student, "seq": seq, "shape": list(tokens.shape),
              "sample_ids": None if sample_ids is None else [int(i) for i in sample_ids],
              "request_id": request_id}
    return encode(header, [tokens.detach().to("cpu", TOKEN_DTYPE).contiguous()])


def request_header_ok(header: dict) -> tuple[int, int]:
    """(student, seq) of a request header; ProtocolError when even those are missing (no one to answer)."""
    student, seq = header.get("student"), header.get("seq")
    if not isinstance(student, int) or not isinstance(seq, int) or isinstance(student, bool):
        raise ProtocolError(f"request header lacks an integer student/seq: {header!r:.200}")
    return student, seq


def decode_request(header: dict, buffers: list[memoryview], info: ServerInfo) -> Request:
    """The request, or RequestRejectedError naming what is wrong with it (the server replies with that text)."""
    student, seq = request_header_ok(header)
    if header.get("type") != "request":
        raise RequestRejectedError(f"message type {header.get('type')!r} is not a request")
    shape = header.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
        raise RequestRejectedError(f"request shape {shape!r} is not [batch, seq]")
    b, s = shape
    if b < 1 or s < 1:
        raise RequestRejectedError(f"empty request: shape {shape}")
    if s > info.max_seq_len:
        raise RequestRejectedError(f"request sequence length {s} exceeds the teacher's maximum {info.max_seq_len}")
    if b * s > info.max_tokens_per_request:
        raise RequestRejectedError(
            f"request of {b}x{s} = {b * s} tokens exceeds the server's max_tokens_per_request "
            f"{info.max_tokens_per_request}"
        )
    if len(buffers) != 1:
        raise RequestRejectedError(f"request carries {len(buffers)} buffers, expected 1 (the token ids)")
    try:
        tokens = tensor_from(buffers[0], TOKEN_DTYPE, (b, s))
    except ProtocolError as e:  # the frame is whole, only its token buffer disagrees with its shape: answerable
        raise RequestRejectedError(f"request token ids: {e}") from None
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= info.vocab_size:
        raise RequestRejectedError(f"token ids out of range: [{lo}, {hi}] for vocabulary size {info.vocab_size}")
    sample_ids = header.get("sample_ids")
    if sample_ids is not None and (not isinstance(sample_ids, list) or len(sample_ids) != b or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in sample_ids)):
        raise RequestRejectedError(f"request has sample ids {sample_ids!r:.80} for {b} sequences (integers)")
    request_id = header.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestRejectedError(f"request id {request_id!r:.80} is not a string")
    return Request(student, seq, tokens, sample_ids, request_id)


# ---- replies ----------------------------------------------------------------------------------------------------
def reply_header(seq: Optional[int], payload: Optional[TopKPayload] = None, error: Optional[str] = None,
                 slot: Optional[int] = None) -> dict:
    """`slot`: for an error reply to a frame whose request seq could not be read, the transport's own number of
    that frame (the shared-memory ring's message number), which the student maps back to its request."""
    if payload is None:
        header = {"type": "reply", "seq": seq, "status": "error", "error": error or "unknown error"}
        return header if slot is None else dict(header, slot=slot)
    return {"type": "reply", "seq": seq, "status": "ok", "payload": json.loads(payload.header.to_json())}


def reply_seq(header: dict) -> int:
    seq = header.get("seq")
    if header.get("type") != "reply" or not isinstance(seq, int) or isinstance(seq, bool):
        raise ProtocolError(f"not a reply header: {header!r:.200}")
    return seq


def check_payload_header(header: dict, shape: Sequence[int], info: ServerInfo) -> PayloadHeader:
    """The payload header of an ok reply, checked against the request and the handshake before any
    buffer is allocated for it."""
    try:
        ph = PayloadHeader.from_dict(header.get("payload"))
    except PayloadError as e:
        raise ProtocolError(f"reply payload header: {e}") from None
    return check_payload_fits(ph, shape, info)


def check_payload_fits(ph: PayloadHeader, shape: Sequence[int], info: ServerInfo) -> PayloadHeader:
    """A reply's payload header against the request's [batch, seq] and what the handshake agreed (k, vocab, T,
    dtype, ...; not which teacher: a reply of another one is refused alone, by RemoteTeacher)."""
    if [ph.batch, ph.seq_len] != list(shape):
        raise ProtocolError(f"reply is for [batch, seq] = [{ph.batch}, {ph.seq_len}], the request was {list(shape)}")
    ph.check(info, served="the reply", expecting="the handshake", error=ProtocolError, identity=False)
    return ph


def pack_payload(payload: TopKPayload, device) -> torch.Tensor:
    """The payload's three buffers as one uint8 tensor (indices, lse, values: every part stays 4-byte aligned),
    so that it moves in one transfer."""
    parts = [payload.indices, payload.lse, payload.values]
    return torch.cat([t.to(device).contiguous().reshape(-1).view(torch.uint8) for t in parts])


def unpack_payload(buf: torch.Tensor, ph: PayloadHeader) -> TopKPayload:
    """Views of a `pack_payload` buffer (no copy), shaped by a header already checked against the request."""
    nv, ni, nl = ph.buffer_sizes()
    if buf.numel() != nv + ni + nl:
        raise ProtocolError(f"packed payload of {buf.numel()} bytes, its header implies {nv + ni + nl}")
    return TopKPayload(*packed_views(buf, ph.batch, ph.seq_len, ph.k, ph.values_dtype), ph)


def packed_views(buf: torch.Tensor, b: int, s: int, k: int, values_dtype: str) -> tuple:
    """(values, indices, lse) viewing a uint8 buffer laid out as `pack_payload` writes it."""
    nl = 4 * b * s
    ni = nl * k
    indices = buf[:ni].view(INDEX_DTYPE).view(b, s, k)
    lse = buf[ni:ni + nl].view(torch.float32).view(b, s)
    values = buf[ni + nl:].view(DTYPES[values_dtype]).view(b, s, k)
    return values, indices, lse


def is_packed_in(payload: TopKPayload, buf: torch.Tensor) -> bool:
    """Are the payload's tensors exactly `packed_views(buf, ...)` (so that `buf` holds the packed payload)?"""
    values, ids, lse = payload.values, payload.indices, payload.lse
    at = buf.data_ptr()
    ni, nl = ids.numel() * ids.element_size(), lse.numel() * lse.element_size()
    return (ids.data_ptr() == at and lse.data_ptr() == at + ni and values.data_ptr() == at + ni + nl
            and ni + nl + values.numel() * values.element_size() == buf.numel() and ids.dtype == INDEX_DTYPE
            and lse.dtype == torch.float32
            and all(t.is_contiguous() and t.device == buf.device for t in (values, ids, lse)))
