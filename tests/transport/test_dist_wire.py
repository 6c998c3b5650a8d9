"""torch.distributed wire formats: request headers and bodies, reply sizes both ends agree on, reply blocks."""

import pytest
import torch

from kd_teacher.payload import TopKPayload
from kd_teacher.transport import dist_wire as W
from kd_teacher.transport import protocol as P

INFO = P.ServerInfo(vocab_size=1000, k=4, temperature=1.0, values_dtype="bfloat16", teacher_fingerprint="t" * 64,
                    recipe_fingerprint="r" * 16, max_tokens_per_request=64, max_seq_len=32)


def _header(batch=2, seq_len=5, n_ids=0, rid=0, kind=W.KIND_REQUEST):
    raw = bytes(W.encode_request_header(kind, 3, 7, batch, seq_len, n_ids, rid).numpy())
    return raw, W.parse_request_header(raw)


def _payload(tokens, sample_ids=None, request_id=None):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*tokens.shape, 1000, generator=g)
    p = TopKPayload.from_logits(logits, 4, tokens=tokens, teacher_fingerprint="t" * 64, recipe_fingerprint="r" * 16,
                                sample_ids=sample_ids, request_id=request_id)
    return TopKPayload(p.values.to(torch.bfloat16), p.indices, p.lse,
                       P.PayloadHeader(**{**vars(p.header), "values_dtype": "bfloat16"}))


def test_request_roundtrip_keeps_tokens_sample_ids_and_request_id():
    tokens = torch.randint(0, 1000, (2, 5))
    rid = "mb-7 ü".encode()
    raw, header = _header(2, 5, 2, len(rid))
    assert len(raw) == W.REQUEST_HEADER_BYTES and (header.student, header.seq) == (3, 7)
    body = W.encode_request_body(tokens, [10, 2**40], rid)
    assert body.numel() == header.body_bytes
    req = W.decode_request_body(header, body, INFO)
    assert torch.equal(req.tokens, tokens) and req.sample_ids == [10, 2**40] and req.request_id == "mb-7 ü"


@pytest.mark.parametrize("mutate, message", [
    (lambda r: b"XXXX" + r[4:], "magic"),
    (lambda r: r[:4] + bytes([9]) + r[5:], "version"),
    (lambda r: r[:5] + bytes([7]) + r[6:], "unknown kind"),
    (lambda r: r[:-1], "bytes, expected"),
])
def test_malformed_request_headers_are_protocol_errors(mutate, message):
    raw, _ = _header()
    with pytest.raises(P.ProtocolError, match=message):
        W.parse_request_header(mutate(raw))


def test_absurd_request_sizes_are_refused_from_the_header_alone():
    assert W.refusal(_header(2, 5)[1], INFO) is None
    assert W.refusal(_header(2, 40)[1], INFO) is None  # over the limit but small: received, then rejected
    assert "far over" in W.refusal(_header(2**20, 2**20)[1], INFO)
    assert "request id" in W.refusal(_header(1, 1, rid=10**4)[1], INFO)


@pytest.mark.parametrize("shape, n_ids, tokens_fill, message", [
    ((1, 2), 0, 1000, "out of range"),
    ((1, 2), 0, -1, "out of range"),
    ((1, 33), 0, 0, "sequence length 33 exceeds"),
    ((3, 30), 0, 0, "90 tokens exceeds"),
    ((2, 3), 1, 0, "1 sample ids for 2"),
])
def test_bad_request_bodies_are_rejected_with_a_reason(shape, n_ids, tokens_fill, message):
    tokens = torch.full(shape, tokens_fill, dtype=torch.int64)
    _, header = _header(*shape, n_ids)
    with pytest.raises(P.RequestRejectedError, match=message):
        W.decode_request_body(header, W.encode_request_body(tokens, list(range(n_ids)), b""), INFO)


def test_request_id_that_is_not_utf8_is_rejected():
    _, header = _header(1, 2, 0, 2)
    body = W.encode_request_body(torch.zeros(1, 2, dtype=torch.int64), None, b"\xff\xfe")
    with pytest.raises(P.RequestRejectedError, match="UTF-8"):
        W.decode_request_body(header, body, INFO)


def test_reply_layout_is_the_block_plus_the_packed_payload_and_error_only_outside_the_limits():
    tokens = torch.randint(0, 1000, (2, 5))
    payload = _payload(tokens, [1, 2], "mb")
    block, total = W.reply_layout(2, 5, 2, INFO)
    assert block % 64 == 0 and total - block == P.pack_payload(payload, "cpu").numel()
    assert len(W.payload_header_json(payload.header)) <= block - 32
    assert W.reply_layout(2, 33, 0, INFO) == (W.ERROR_BLOCK_BYTES, W.ERROR_BLOCK_BYTES)
    assert W.reply_layout(3, 30, 0, INFO) == (W.ERROR_BLOCK_BYTES, W.ERROR_BLOCK_BYTES)


def test_reply_block_roundtrip_and_the_payload_header_it_carries():
    tokens = torch.randint(0, 1000, (2, 5))
    payload = _payload(tokens, [2**62, 5])
    block, _ = W.reply_layout(2, 5, 0, INFO)
    status, text = W.decode_block(W.encode_block(9, block, ok_json=W.payload_header_json(payload.header)), 9, block)
    ph = P.PayloadHeader.from_json(text)
    assert status == W.STATUS_OK and ph == payload.header
    assert P.check_payload_fits(ph, (2, 5), INFO) is ph


def test_reply_for_another_request_or_of_another_size_is_a_protocol_error():
    raw = W.encode_block(9, 256, error="nope")
    assert W.decode_block(raw, 9, 256) == (W.STATUS_ERROR, '{"error": "nope"}')
    with pytest.raises(P.ProtocolError, match="reply is for request 9, the next one expected is 8"):
        W.decode_block(raw, 8, 256)
    with pytest.raises(P.ProtocolError, match="expected a 320-byte block"):
        W.decode_block(raw + bytes(64), 9, 320)
    with pytest.raises(P.ProtocolError, match="not a kd-teacher reply"):
        W.decode_block(bytes(256), 9, 256)


def test_long_error_text_is_cut_to_fit_and_a_payload_header_that_does_not_fit_is_refused():
    raw = W.encode_block(1, 128, error="x" * 10_000)
    status, text = W.decode_block(raw, 1, 128)
    assert status == W.STATUS_ERROR and W.error_text(text).endswith("...") and len(raw) == 128
    with pytest.raises(ValueError, match="does not fit"):
        W.encode_block(1, 128, ok_json=b"{" + b" " * 200 + b"}")
