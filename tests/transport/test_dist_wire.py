"""torch.distributed wire formats: requests (one message: header and body), reply sizes both ends agree on,
binary reply blocks."""

import pytest
import torch

from kd_teacher.payload import TopKPayload
from kd_teacher.transport import dist_wire as W
from kd_teacher.transport import protocol as P
from kd_teacher.transport import reply_block as RB

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


def test_request_is_one_message_that_fits_the_teachers_receive_buffers():
    tokens = torch.randint(0, 1000, (2, 5))
    message = W.encode_request(3, 7, tokens, [4, 5], b"mb")
    header = W.parse_request_header(bytes(message[:W.REQUEST_HEADER_BYTES].numpy()))
    assert (header.student, header.seq, header.batch, header.seq_len) == (3, 7, 2, 5)
    assert message.numel() == W.REQUEST_HEADER_BYTES + header.body_bytes <= W.request_capacity(INFO)
    req = W.decode_request_body(header, message[W.REQUEST_HEADER_BYTES:], INFO)
    assert torch.equal(req.tokens, tokens) and req.sample_ids == [4, 5] and req.request_id == "mb"
    message.zero_()  # the teacher reuses its receive buffers: the request keeps its own tokens
    assert torch.equal(req.tokens, tokens)


def test_reply_layout_is_the_block_plus_the_packed_payload_and_error_only_outside_the_limits():
    tokens = torch.randint(0, 1000, (2, 5))
    payload = _payload(tokens, [1, 2], "mb")
    block, total = W.reply_layout(2, 5, INFO)
    assert block % 64 == 0 and total - block == P.pack_payload(payload, "cpu").numel()
    assert len(RB.encode_ok(1, block, payload.header)) == block
    assert W.reply_layout(2, 33, INFO) == (W.ERROR_BLOCK_BYTES, W.ERROR_BLOCK_BYTES)
    assert W.reply_layout(3, 30, INFO) == (W.ERROR_BLOCK_BYTES, W.ERROR_BLOCK_BYTES)
    assert RB.block_bytes(1000) >= 80 + 1000 * 24  # room for every sequence's hash and sample id


def test_reply_block_roundtrip_gives_the_payload_header_back():
    tokens = torch.randint(0, 1000, (2, 5))
    payload = _payload(tokens, [2**62, 5], "mb")
    block, _ = W.reply_layout(2, 5, INFO)
    ph, error = RB.decode(RB.encode_ok(9, block, payload.header), 9, (2, 5), INFO, request_id="mb")
    assert error is None and ph == payload.header
    assert P.check_payload_fits(ph, (2, 5), INFO) is ph
    payload.header.sample_ids = None
    ph, _ = RB.decode(RB.encode_ok(9, block, payload.header), 9, (2, 5), INFO, request_id="mb")
    assert ph.sample_ids is None and ph.token_hashes == payload.header.token_hashes


@pytest.mark.parametrize("change, message", [
    (dict(k=5), "k: the handshake expects 4, the reply has 5"),
    (dict(temperature=2.0), "temperature: the handshake expects 1.0, the reply has 2.0"),
    (dict(values_dtype="float32"), "values_dtype: the handshake expects 'bfloat16', the reply has 'float32'"),
    (dict(batch=1, seq_len=10, token_hashes=["00" * 16], sample_ids=None), r"\[batch, seq\] = \[1, 10\]"),
])
def test_reply_that_does_not_fit_the_request_or_the_handshake_is_a_protocol_error(change, message):
    header = P.PayloadHeader(**{**vars(_payload(torch.randint(0, 1000, (2, 5))).header), **change})
    raw = RB.encode_ok(9, RB.block_bytes(2), header)
    with pytest.raises(P.ProtocolError, match=message):
        RB.decode(raw, 9, (2, 5), INFO)


def test_reply_of_another_teacher_keeps_the_channel_but_not_the_fingerprints():
    header = _payload(torch.randint(0, 1000, (2, 5))).header
    header.teacher_fingerprint = "another"
    ph, _ = RB.decode(RB.encode_ok(9, RB.block_bytes(2), header), 9, (2, 5), INFO)
    assert ph.teacher_fingerprint != INFO.teacher_fingerprint  # RemoteTeacher refuses this payload


def test_reply_for_another_request_or_not_a_reply_is_a_protocol_error():
    raw = RB.encode_error(9, 256, "nope")
    assert RB.decode(raw, 9, (2, 5), INFO) == (None, "nope")
    with pytest.raises(P.ProtocolError, match="reply is for request 9, the next one expected is 8"):
        RB.decode(raw, 8, (2, 5), INFO)
    with pytest.raises(P.ProtocolError, match="not a kd-teacher reply"):
        RB.decode(bytes(256), 9, (2, 5), INFO)
    with pytest.raises(P.ProtocolError, match="shorter than its prefix"):
        RB.decode(raw[:40], 9, (2, 5), INFO)


def test_long_error_text_is_cut_to_fit_and_a_header_that_does_not_fit_is_refused():
    raw = RB.encode_error(1, 128, "x" * 10_000)
    _, text = RB.decode(raw, 1, (1, 1), INFO)
    assert text.endswith("...") and len(raw) == 128
    header = _payload(torch.randint(0, 1000, (2, 5))).header
    with pytest.raises(ValueError, match="does not fit"):
        RB.encode_ok(1, 96, header)
    header.extraction = "x" * 17
    with pytest.raises(ValueError, match="longer than 16 bytes"):
        RB.encode_ok(1, RB.block_bytes(2), header)


def test_a_payload_with_placeholder_rows_is_not_sent_as_if_it_were_whole():
    header = _payload(torch.randint(0, 1000, (2, 5))).header
    header.present = [True, False]
    with pytest.raises(ValueError, match="cannot say which sequences are placeholders"):
        RB.encode_ok(1, RB.block_bytes(2), header)
