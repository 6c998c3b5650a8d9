"""The fixed binary block in front of every reply of the torch.distributed transport: everything the student
checks before it uses the payload that follows, with no JSON on the per-message path.

    prefix (80 bytes, little-endian)
      magic "KDTB", version, status (0 ok / 1 error), values dtype code, flags (1 token hashes, 2 sample ids)
      seq u64, batch u32, seq_len u32, k u32, vocab u32, temperature f64, text bytes u32, schema version u32,
      identity digest (16 bytes: `TeacherContract.identity_digest`, the teacher and recipe fingerprints),
      extraction (16 bytes ASCII)
    ok     batch x 16-byte token hashes (the BLAKE2b-128 digests that PayloadHeader.token_hashes holds in hex),
           then batch x int64 sample ids when flagged
    error  the error text, UTF-8, cut to fit
    zero padding to the block's size (`block_bytes(batch)`: a multiple of 64, so the payload after it stays
    aligned, and at least MIN_BLOCK_BYTES, room for an error text)

Why binary: writing the PayloadHeader as JSON cost the teacher ~20 us a message and parsing and checking it
cost the student ~30 us, while a 3 MB NCCL transfer takes 44 us. The block carries only what the student
cannot know; the student rebuilds the PayloadHeader from its request (shape, request id) and the handshake
(what the teacher serves; its identity fields only where the block's digest of them agrees), then checks it
against the request and the handshake (`protocol.check_payload_fits`) and, in RemoteTeacher, the token hashes
against the ones it computed when it sent the request.
"""

from __future__ import annotations

import struct
from dataclasses import asdict
from typing import Optional, Sequence

from kd_teacher.contract import IDENTITY_FIELDS
from kd_teacher.dtypes import WIRE_CODES, WIRE_NAMES
from kd_teacher.payload import SCHEMA_VERSION, PayloadHeader
from kd_teacher.transport import protocol as P

VERSION = 2
STATUS_OK, STATUS_ERROR = 0, 1
MIN_BLOCK_BYTES = 1024
HASH_BYTES = 16
_PREFIX = struct.Struct("<4sBBBBQIIIIdII16s16s")
_MAGIC = b"KDTB"
_ALIGN = 64
_HAS_HASHES, _HAS_SAMPLE_IDS = 1, 2
_PER_SEQUENCE_BYTES = HASH_BYTES + 8


def block_bytes(batch: int) -> int:
    n = max(_PREFIX.size + batch * _PER_SEQUENCE_BYTES, MIN_BLOCK_BYTES)
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# ---- teacher side -----------------------------------------------------------------------------------------------
def encode_ok(seq: int, size: int, header: PayloadHeader) -> bytearray:
    """The block of an ok reply; ValueError if the header cannot be written (the teacher answers with an error)."""
    b = header.batch
    flags = (_HAS_HASHES if header.token_hashes else 0) | (_HAS_SAMPLE_IDS if header.sample_ids is not None else 0)
    extraction = header.extraction.encode()
    if len(extraction) > 16:
        raise ValueError(f"extraction name {header.extraction!r} is longer than 16 bytes")
    if header.present is not None and not all(header.present):
        raise ValueError("a reply block cannot say which sequences are placeholders (PayloadHeader.present)")
    if header.values_dtype not in WIRE_CODES:
        raise ValueError(f"values dtype {header.values_dtype!r} has no wire code")
    if _PREFIX.size + b * _PER_SEQUENCE_BYTES > size:
        raise ValueError(f"a reply header for {b} sequences does not fit a {size}-byte block")
    out = bytearray(size)
    _PREFIX.pack_into(out, 0, _MAGIC, VERSION, STATUS_OK, WIRE_CODES[header.values_dtype], flags, seq, b,
                      header.seq_len, header.k, header.vocab_size, float(header.temperature), 0,
                      header.schema_version, header.identity_digest(), extraction)
    at = _PREFIX.size
    if header.token_hashes:
        digests = bytes.fromhex("".join(header.token_hashes))
        if len(digests) != b * HASH_BYTES:
            raise ValueError(f"payload carries {len(header.token_hashes)} token hashes of "
                             f"{len(digests)} bytes for {b} sequences")
        out[at:at + len(digests)] = digests
        at += len(digests)
    if header.sample_ids is not None:
        struct.pack_into(f"<{b}q", out, at, *header.sample_ids)
    return out


def encode_error(seq: int, size: int, error: str) -> bytearray:
    room = size - _PREFIX.size
    text = error.encode()
    if len(text) > room:
        text = text[:room - 3].decode(errors="ignore").encode() + b"..."
    out = bytearray(size)
    _PREFIX.pack_into(out, 0, _MAGIC, VERSION, STATUS_ERROR, 0, 0, seq, 0, 0, 0, 0, 0.0, len(text), SCHEMA_VERSION,
                      bytes(16), bytes(16))
    out[_PREFIX.size:_PREFIX.size + len(text)] = text
    return out


# ---- student side -----------------------------------------------------------------------------------------------
def decode(raw, seq: int, shape: Sequence[int], info: P.ServerInfo,
           request_id: Optional[str] = None) -> tuple[Optional[PayloadHeader], Optional[str]]:
    """(payload header, None) of an ok reply to request `seq` of `shape`, or (None, error text); ProtocolError
    if the block is not that reply or does not fit the handshake."""
    if len(raw) < _PREFIX.size:
        raise P.ProtocolError(f"reply block of {len(raw)} bytes is shorter than its prefix")
    (magic, version, status, dtype, flags, got_seq, b, s, k, vocab, temperature, text_len, schema, fp,
     extraction) = _PREFIX.unpack_from(raw, 0)
    if magic != _MAGIC or version != VERSION:
        raise P.ProtocolError(f"not a kd-teacher reply block (magic {magic!r}, version {version})")
    if got_seq != seq:
        raise P.ProtocolError(f"reply is for request {got_seq}, the next one expected is {seq}")
    if status == STATUS_ERROR:
        if text_len > len(raw) - _PREFIX.size:
            raise P.ProtocolError(f"error reply claims {text_len} bytes of text in a {len(raw)}-byte block")
        try:
            return None, bytes(raw[_PREFIX.size:_PREFIX.size + text_len]).decode()
        except UnicodeDecodeError:
            raise P.ProtocolError("error reply text is not UTF-8") from None
    if status != STATUS_OK:
        raise P.ProtocolError(f"reply block has unknown status {status}")
    if schema != SCHEMA_VERSION:
        raise P.ProtocolError(f"reply payload schema version {schema} is not understood ({SCHEMA_VERSION})")
    if dtype not in WIRE_NAMES:
        raise P.ProtocolError(f"reply values dtype code {dtype} is not one of {sorted(WIRE_NAMES)}")
    if [b, s] != list(shape):  # before b sizes anything below
        raise P.ProtocolError(f"reply is for [batch, seq] = [{b}, {s}], the request was {list(shape)}")
    if _PREFIX.size + b * _PER_SEQUENCE_BYTES > len(raw):
        raise P.ProtocolError(f"reply block of {len(raw)} bytes has no room for {b} sequences")
    at, hashes = _PREFIX.size, []
    if flags & _HAS_HASHES:
        text = bytes(raw[at:at + b * HASH_BYTES]).hex()
        hashes = [text[i:i + 2 * HASH_BYTES] for i in range(0, len(text), 2 * HASH_BYTES)]
        at += b * HASH_BYTES
    sample_ids = list(struct.unpack_from(f"<{b}q", raw, at)) if flags & _HAS_SAMPLE_IDS else None
    try:
        extraction_name = extraction.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise P.ProtocolError(f"reply extraction name {extraction!r} is not ASCII") from None
    served = asdict(info.contract())  # what the handshake agreed; the block's own fields override it below
    if fp != info.identity_digest():
        # Not a ProtocolError: the channel is in step; RemoteTeacher refuses this one payload (PayloadError).
        served.update({name: f"not the handshake's (digest {fp.hex()})" for name in IDENTITY_FIELDS})
    served.update(k=k, temperature=temperature, vocab_size=vocab, values_dtype=WIRE_NAMES[dtype],
                  extraction=extraction_name)
    header = PayloadHeader(**served, batch=b, seq_len=s, token_hashes=hashes, sample_ids=sample_ids,
                           request_id=request_id)
    return P.check_payload_fits(header, shape, info), None
