"""Message formats of the torch.distributed transport: fixed-size binary request headers and replies whose
size both ends know in advance.

Why sizes known in advance: a student posts the receive of a reply when it sends the request, so the
transfer runs as soon as the teacher sends, with no control message in between. For that, the reply to a
request of shape [b, s] is always `reply_layout(b, s, info)` bytes, ok or not:

    reply   = block | payload     (payload: indices, lse, values as `protocol.pack_payload`)
    block   = `reply_block`: a fixed binary prefix (seq, status, shape, k, vocab, T, dtype, fingerprint digest),
              then the token hashes and sample ids (ok) or the error text (error; the payload bytes are zeros)

A request whose shape is outside the handshake's limits gets an error-only reply (ERROR_BLOCK_BYTES, no
payload part), so neither side ever sizes a buffer from an unchecked shape.

A request is one message: a REQUEST_HEADER_BYTES header (magic, version, kind, student, seq, batch, seq_len,
number of sample ids, request-id bytes), then its body (token ids int64, sample ids int64, request id UTF-8).
The teacher keeps a few receives of `request_capacity(info)` bytes posted (gloo takes a message shorter than the
buffer) and reuses them, so nothing is allocated per request and nothing is sized from a header; a header that
claims a body over `max_body_bytes` gets an error reply. One message, not a header and a body: a body waiting
in the socket for its receive to be posted made gloo's event loop spin (~0.7 ms of CPU a request).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from kd_teacher.dtypes import DTYPES
from kd_teacher.transport import protocol as P
from kd_teacher.transport import reply_block as RB

VERSION = 2  # 2: binary reply blocks (`reply_block`); 1 had JSON payload headers
KIND_REQUEST, KIND_BYE = 1, 2
REQUEST_HEADER_BYTES = 64
MAX_REQUEST_ID_BYTES = 256
ERROR_BLOCK_BYTES = RB.MIN_BLOCK_BYTES

_REQUEST = struct.Struct("<4sBBHIQIIIH")  # magic, version, kind, -, student, seq, batch, seq_len, n_ids, rid bytes
_REQUEST_MAGIC = b"KDTQ"
# ---- requests ---------------------------------------------------------------------------------------------------
@dataclass
class RequestHeader:
    kind: int
    student: int
    seq: int
    batch: int
    seq_len: int
    num_sample_ids: int
    request_id_bytes: int

    @property
    def body_bytes(self) -> int:
        return 8 * (self.batch * self.seq_len + self.num_sample_ids) + self.request_id_bytes


def encode_request_header(kind: int, student: int, seq: int, batch: int = 0, seq_len: int = 0,
                          num_sample_ids: int = 0, request_id_bytes: int = 0) -> torch.Tensor:
    raw = bytearray(REQUEST_HEADER_BYTES)
    _REQUEST.pack_into(raw, 0, _REQUEST_MAGIC, VERSION, kind, 0, student, seq, batch, seq_len, num_sample_ids,
                       request_id_bytes)
    return torch.frombuffer(raw, dtype=torch.uint8)


def parse_request_header(raw: bytes) -> RequestHeader:
    """The header's fields; ProtocolError for anything that is not a request header of this version."""
    if len(raw) != REQUEST_HEADER_BYTES:
        raise P.ProtocolError(f"request header of {len(raw)} bytes, expected {REQUEST_HEADER_BYTES}")
    magic, version, kind, _, student, seq, batch, seq_len, n_ids, rid = _REQUEST.unpack_from(raw, 0)
    if magic != _REQUEST_MAGIC:
        raise P.ProtocolError(f"not a kd-teacher request header (magic {magic!r})")
    if version != VERSION:
        raise P.ProtocolError(f"request header version {version}, this server speaks {VERSION}")
    if kind not in (KIND_REQUEST, KIND_BYE):
        raise P.ProtocolError(f"request header of unknown kind {kind}")
    return RequestHeader(kind, student, seq, batch, seq_len, n_ids, rid)


def max_body_bytes(info: P.ServerInfo) -> int:
    """The largest request body a server takes in: twice the token limit (so that a request a little over the
    limit still gets its error reply), one sample id per sequence, a request id."""
    return 8 * 2 * 2 * info.max_tokens_per_request + MAX_REQUEST_ID_BYTES


def request_capacity(info: P.ServerInfo) -> int:
    """Bytes of the buffers a teacher receives requests into: the largest request message it takes."""
    return REQUEST_HEADER_BYTES + max_body_bytes(info)


def refusal(header: RequestHeader, info: P.ServerInfo) -> Optional[str]:
    """Why this request is refused from its header alone (None: its body is read). A student checks it before
    sending: a message larger than the teacher's receive buffers would end the teacher's process (gloo)."""
    if header.request_id_bytes > MAX_REQUEST_ID_BYTES:
        return f"request id of {header.request_id_bytes} bytes exceeds {MAX_REQUEST_ID_BYTES}"
    if header.body_bytes > max_body_bytes(info):
        return (f"request of {header.batch}x{header.seq_len} tokens ({header.body_bytes} bytes) is far over the "
                f"server's max_tokens_per_request {info.max_tokens_per_request}; not received")
    return None


def encode_request(student: int, seq: int, tokens: torch.Tensor, sample_ids: Optional[Sequence[int]],
                   request_id: bytes) -> torch.Tensor:
    """A request's one message: its header, then its body."""
    b, s = tokens.shape
    head = encode_request_header(KIND_REQUEST, student, seq, b, s, len(sample_ids or ()), len(request_id))
    return _joined([head.numpy(), *_body_parts(tokens, sample_ids, request_id)])


def encode_request_body(tokens: torch.Tensor, sample_ids: Optional[Sequence[int]], request_id: bytes) -> torch.Tensor:
    """Token ids (int64, row-major), then sample ids (int64), then the request id's UTF-8 bytes."""
    return _joined(_body_parts(tokens, sample_ids, request_id))


def _body_parts(tokens: torch.Tensor, sample_ids, request_id: bytes) -> list:
    parts = [tokens.detach().to("cpu", torch.int64).contiguous().numpy().reshape(-1).view(np.uint8)]
    if sample_ids:
        parts.append(np.array([int(i) for i in sample_ids], dtype="<i8").view(np.uint8))
    if request_id:
        parts.append(np.frombuffer(request_id, dtype=np.uint8))
    return parts


def _joined(parts: list) -> torch.Tensor:
    # numpy, not torch.cat: a CPU torch op over more than 32k elements runs on the intra-op thread pool, and
    # waking that pool cost milliseconds a request in a process with many threads (measured on the GPU host).
    return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0].copy())


def decode_request_body(header: RequestHeader, body: torch.Tensor, info: P.ServerInfo) -> P.Request:
    """The request, or RequestRejectedError naming what is wrong with it."""
    b, s = header.batch, header.seq_len
    if b < 1 or s < 1:
        raise P.RequestRejectedError(f"empty request: shape [{b}, {s}]")
    if s > info.max_seq_len:
        raise P.RequestRejectedError(f"request sequence length {s} exceeds the teacher's maximum {info.max_seq_len}")
    if b * s > info.max_tokens_per_request:
        raise P.RequestRejectedError(f"request of {b}x{s} = {b * s} tokens exceeds the server's "
                                     f"max_tokens_per_request {info.max_tokens_per_request}")
    if header.num_sample_ids not in (0, b):
        raise P.RequestRejectedError(f"request has {header.num_sample_ids} sample ids for {b} sequences")
    n = b * s * 8
    raw = body.numpy()
    # A copy: the body is a receive buffer that is reused. numpy for the same reason as in `_joined`.
    ids = raw[:n].view("<i8").reshape(b, s).copy()
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= info.vocab_size:
        raise P.RequestRejectedError(f"token ids out of range: [{lo}, {hi}] for vocabulary size {info.vocab_size}")
    ids_end = n + 8 * header.num_sample_ids
    sample_ids = raw[n:ids_end].view("<i8").tolist() if header.num_sample_ids else None
    try:
        request_id = raw[ids_end:].tobytes().decode() if header.request_id_bytes else None
    except UnicodeDecodeError:
        raise P.RequestRejectedError("request id is not UTF-8") from None
    tokens = torch.from_numpy(ids)
    return P.Request(header.student, header.seq, tokens, sample_ids, request_id)


# ---- replies ----------------------------------------------------------------------------------------------------
def payload_fits(batch: int, seq_len: int, info: P.ServerInfo) -> bool:
    return 1 <= batch and 1 <= seq_len <= info.max_seq_len and batch * seq_len <= info.max_tokens_per_request


def payload_bytes(batch: int, seq_len: int, info: P.ServerInfo) -> int:
    value_bytes = DTYPES[info.values_dtype].itemsize
    n = batch * seq_len
    return n * info.k * (value_bytes + 4) + 4 * n


def reply_layout(batch: int, seq_len: int, info: P.ServerInfo) -> tuple[int, int]:
    """(block bytes, total bytes) of the reply to a request of this shape: what both ends agree on."""
    if not payload_fits(batch, seq_len, info):
        return ERROR_BLOCK_BYTES, ERROR_BLOCK_BYTES
    block = RB.block_bytes(batch)
    return block, block + payload_bytes(batch, seq_len, info)
