"""Message formats of the torch.distributed transport: fixed-size binary request headers and self-describing
replies whose size both ends know in advance.

Why sizes known in advance: a student posts the receive of a reply when it sends the request, so the
transfer runs as soon as the teacher sends, with no control message in between. For that, the reply to a
request of shape [b, s] (with an r-byte request id) is always `reply_layout(b, s, r, info)` bytes, ok or not:

    reply   = block | payload                  (payload: indices, lse, values as `protocol.pack_payload`)
    block   = prefix | JSON | zero padding     (block_bytes(b, r, info): room for b token hashes and sample ids)
    prefix  = magic "KDTR", version, status (0 ok / 1 error), seq, JSON length, block length
    JSON    = the PayloadHeader (ok) or {"error": text} (error; the payload bytes are zeros)

A request whose shape is outside the handshake's limits gets an error-only reply (ERROR_BLOCK_BYTES, no
payload part), so neither side ever sizes a buffer from an unchecked shape.

A request is two messages: a REQUEST_HEADER_BYTES header (magic, version, kind, student, seq, batch, seq_len,
number of sample ids, request-id bytes) and a body (token ids int64, sample ids int64, request id UTF-8). The
teacher reads the header first and refuses a body larger than `max_body_bytes` before allocating anything.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from kd_teacher.payload import DTYPES, PayloadHeader
from kd_teacher.transport import protocol as P

VERSION = 1
KIND_REQUEST, KIND_BYE = 1, 2
REQUEST_HEADER_BYTES = 64
MAX_REQUEST_ID_BYTES = 256
ERROR_BLOCK_BYTES = 1024
STATUS_OK, STATUS_ERROR = 0, 1

_REQUEST = struct.Struct("<4sBBHIQIIIH")  # magic, version, kind, -, student, seq, batch, seq_len, n_ids, rid bytes
_REQUEST_MAGIC = b"KDTQ"
_REPLY = struct.Struct("<4sBBHQII")  # magic, version, status, -, seq, JSON length, block length
_REPLY_MAGIC = b"KDTR"
_PREFIX_BYTES = 32
_ALIGN = 64  # the payload after the block stays aligned for int32 / float32 / bf16 views
# Room in the JSON per sequence: a 32-hex-digit hash in quotes with a comma, and an int64 sample id with a comma.
_PER_SEQUENCE_BYTES = 35 + 21
_FIXED_JSON_BYTES = 1024  # the other PayloadHeader fields and keys


def _round_up(n: int, to: int = _ALIGN) -> int:
    return (n + to - 1) // to * to


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


def refusal(header: RequestHeader, info: P.ServerInfo) -> Optional[str]:
    """Why the body of this request cannot even be received (None: it can); checked before allocating it."""
    if header.request_id_bytes > MAX_REQUEST_ID_BYTES:
        return f"request id of {header.request_id_bytes} bytes exceeds {MAX_REQUEST_ID_BYTES}"
    if header.body_bytes > max_body_bytes(info):
        return (f"request of {header.batch}x{header.seq_len} tokens ({header.body_bytes} bytes) is far over the "
                f"server's max_tokens_per_request {info.max_tokens_per_request}; not received")
    return None


def encode_request_body(tokens: torch.Tensor, sample_ids: Optional[Sequence[int]], request_id: bytes) -> torch.Tensor:
    """Token ids (int64, row-major), then sample ids (int64), then the request id's UTF-8 bytes."""
    flat = tokens.reshape(-1).view(torch.uint8)
    if not sample_ids and not request_id:
        return flat
    parts = [flat]
    if sample_ids:
        parts.append(torch.tensor([int(i) for i in sample_ids], dtype=torch.int64).view(torch.uint8))
    if request_id:
        parts.append(torch.frombuffer(bytearray(request_id), dtype=torch.uint8))
    return torch.cat(parts)


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
    tokens = body[:n].view(torch.int64).view(b, s)
    lo, hi = (int(x) for x in torch.aminmax(tokens))
    if lo < 0 or hi >= info.vocab_size:
        raise P.RequestRejectedError(f"token ids out of range: [{lo}, {hi}] for vocabulary size {info.vocab_size}")
    ids_end = n + 8 * header.num_sample_ids
    sample_ids = body[n:ids_end].view(torch.int64).tolist() if header.num_sample_ids else None
    try:
        request_id = bytes(body[ids_end:].numpy()).decode() if header.request_id_bytes else None
    except UnicodeDecodeError:
        raise P.RequestRejectedError("request id is not UTF-8") from None
    return P.Request(header.student, header.seq, tokens, sample_ids, request_id)


# ---- replies ----------------------------------------------------------------------------------------------------
def payload_fits(batch: int, seq_len: int, info: P.ServerInfo) -> bool:
    return 1 <= batch and 1 <= seq_len <= info.max_seq_len and batch * seq_len <= info.max_tokens_per_request


def block_bytes(batch: int, request_id_bytes: int, info: P.ServerInfo) -> int:
    """Room for the reply's PayloadHeader JSON (JSON escapes take at most 6 bytes per byte of text)."""
    text = 6 * (len(info.teacher_fingerprint) + len(info.recipe_fingerprint) + request_id_bytes)
    return _round_up(_PREFIX_BYTES + _FIXED_JSON_BYTES + text + batch * _PER_SEQUENCE_BYTES)


def payload_bytes(batch: int, seq_len: int, info: P.ServerInfo) -> int:
    value_bytes = DTYPES[info.values_dtype].itemsize
    n = batch * seq_len
    return n * info.k * (value_bytes + 4) + 4 * n


def reply_layout(batch: int, seq_len: int, request_id_bytes: int, info: P.ServerInfo) -> tuple[int, int]:
    """(block bytes, total bytes) of the reply to a request of this shape: what both ends agree on."""
    if not payload_fits(batch, seq_len, info):
        return ERROR_BLOCK_BYTES, ERROR_BLOCK_BYTES
    block = block_bytes(batch, request_id_bytes, info)
    return block, block + payload_bytes(batch, seq_len, info)


def payload_header_json(header: PayloadHeader) -> bytes:
    return json.dumps(vars(header), separators=(",", ":")).encode()


def encode_block(seq: int, size: int, ok_json: Optional[bytes] = None, error: Optional[str] = None) -> bytes:
    """A reply block of exactly `size` bytes; an error text is cut to fit. ValueError if ok_json does not fit
    (the server then answers with an error instead)."""
    room = size - _PREFIX_BYTES
    if ok_json is not None:
        if len(ok_json) > room:
            raise ValueError(f"payload header of {len(ok_json)} bytes does not fit a {size}-byte reply block")
        status, text = STATUS_OK, ok_json
    else:
        status, text = STATUS_ERROR, _error_json(error or "unknown error", room)
    out = bytearray(size)
    _REPLY.pack_into(out, 0, _REPLY_MAGIC, VERSION, status, 0, seq, len(text), size)
    out[_PREFIX_BYTES:_PREFIX_BYTES + len(text)] = text
    return bytes(out)


def _error_json(error: str, room: int) -> bytes:
    text = json.dumps({"error": error}).encode()
    while len(text) > room:
        error = error[:max(0, len(error) - (len(text) - room) - 8)] + "..."
        text = json.dumps({"error": error}).encode()
    return text


def decode_block(raw: bytes, seq: int, size: int) -> tuple[int, str]:
    """(status, JSON text) of the reply block to request `seq`; ProtocolError if it is not that reply."""
    if len(raw) < _PREFIX_BYTES:
        raise P.ProtocolError(f"reply block of {len(raw)} bytes is shorter than its prefix")
    magic, version, status, _, got_seq, text_len, got_size = _REPLY.unpack_from(raw, 0)
    if magic != _REPLY_MAGIC or version != VERSION:
        raise P.ProtocolError(f"not a kd-teacher reply (magic {magic!r}, version {version})")
    if got_seq != seq:
        raise P.ProtocolError(f"reply is for request {got_seq}, the next one expected is {seq}")
    if got_size != size or status not in (STATUS_OK, STATUS_ERROR) or text_len > size - _PREFIX_BYTES:
        raise P.ProtocolError(f"reply block claims {got_size} bytes / status {status} / {text_len} bytes of "
                              f"header, expected a {size}-byte block")
    try:
        return status, bytes(raw[_PREFIX_BYTES:_PREFIX_BYTES + text_len]).decode()
    except UnicodeDecodeError:
        raise P.ProtocolError("reply header is not UTF-8") from None


def error_text(text: str) -> str:
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        raise P.ProtocolError(f"error reply is not {{'error': text}}: {text[:200]!r}") from None
