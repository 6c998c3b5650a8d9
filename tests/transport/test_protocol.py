"""Wire protocol: framing bounds, request checks, reply-header checks, the connect-time compatibility check."""

import struct

import pytest
import torch

from kd_teacher.contract import TeacherContract
from kd_teacher.payload import PayloadHeader, TopKPayload
from kd_teacher.transport import protocol as P

INFO = P.ServerInfo(vocab_size=1000, k=4, temperature=1.0, values_dtype="float32", teacher_fingerprint="t",
                    recipe_fingerprint="r", max_tokens_per_request=64, max_seq_len=32)


def _payload(tokens):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*tokens.shape, 1000, generator=g)
    return TopKPayload.from_logits(logits, 4, tokens=tokens, teacher_fingerprint="t", recipe_fingerprint="r")


def test_frame_roundtrip_keeps_header_and_buffers():
    tokens = torch.arange(6).reshape(2, 3)
    header, buffers = P.decode(P.encode({"a": 1}, [tokens, b"xyz"]), 1 << 20)
    assert header["a"] == 1 and header["buffers"] == [48, 3]
    assert torch.equal(P.tensor_from(buffers[0], torch.int64, (2, 3)), tokens)
    assert bytes(buffers[1]) == b"xyz"


@pytest.mark.parametrize("mutate, message", [
    (lambda m: b"XXXX" + m[4:], "magic"),
    (lambda m: m[:4] + struct.pack("<I", 2**31) + m[8:], "absurd"),
    (lambda m: m + b"\0", "implies"),
    (lambda m: m[:-1], "implies"),
])
def test_malformed_frames_are_refused_naming_the_problem(mutate, message):
    msg = P.encode({"a": 1}, [b"abcd"])
    with pytest.raises(P.ProtocolError, match=message):
        P.decode(mutate(msg), 1 << 20)


def test_message_over_the_limit_is_refused_before_parsing():
    with pytest.raises(P.ProtocolError, match="exceeds the limit"):
        P.decode(P.encode({}, [bytes(100)]), 64)


def test_valid_request_decodes_to_the_same_tokens():
    tokens = torch.randint(0, 1000, (2, 8))
    header, buffers = P.decode(P.encode_request(3, 7, tokens, [10, 11], "mb-1"), 1 << 20)
    req = P.decode_request(header, buffers, INFO)
    assert (req.student, req.seq, req.sample_ids, req.request_id) == (3, 7, [10, 11], "mb-1")
    assert torch.equal(req.tokens, tokens)


@pytest.mark.parametrize("tokens, message", [
    (torch.tensor([[1, 1000]]), "out of range"),
    (torch.tensor([[-1, 2]]), "out of range"),
    (torch.zeros(1, 33, dtype=torch.long), "sequence length 33 exceeds"),
    (torch.zeros(3, 30, dtype=torch.long), "90 tokens exceeds"),
])
def test_bad_requests_are_rejected_with_a_reason(tokens, message):
    header, buffers = P.decode(P.encode_request(0, 1, tokens), 1 << 20)
    with pytest.raises(P.RequestRejectedError, match=message):
        P.decode_request(header, buffers, INFO)


def test_request_whose_buffer_does_not_match_its_shape_is_rejected():
    """Rejected (the server answers it with this error), not a ProtocolError (which the shm server could not
    answer by seq: the student waited timeout_s)."""
    header, buffers = P.decode(P.encode_request(0, 1, torch.zeros(2, 4, dtype=torch.long)), 1 << 20)
    header["shape"] = [2, 5]
    with pytest.raises(P.RequestRejectedError, match="bytes for a"):
        P.decode_request(header, buffers, INFO)


def test_reply_header_must_match_the_request_and_the_handshake():
    tokens = torch.randint(0, 1000, (2, 5))
    header = P.reply_header(1, _payload(tokens))
    assert P.check_payload_header(header, (2, 5), INFO).batch == 2
    with pytest.raises(P.ProtocolError, match="request was"):
        P.check_payload_header(header, (2, 6), INFO)
    absurd = dict(header, payload=dict(header["payload"], batch=2**40, token_hashes=[]))
    with pytest.raises(P.ProtocolError, match="request was"):
        P.check_payload_header(absurd, (2, 5), INFO)
    other_k = P.ServerInfo(**{**INFO.__dict__, "k": 8})
    with pytest.raises(P.ProtocolError, match="handshake"):
        P.check_payload_header(header, (2, 5), other_k)


def test_incompatibilities_name_each_field():
    assert P.incompatibilities(INFO, TeacherContract(vocab_size=1000, k=4, temperature=1.0)) == []
    problems = P.incompatibilities(INFO, TeacherContract(vocab_size=1001, k=8, temperature=2.0,
                                                       teacher_fingerprint="other"))
    assert [p.split(":")[0] for p in problems] == ["vocab_size", "k", "temperature", "teacher_fingerprint"]


def test_packed_views_are_recognised_only_as_the_buffer_they_view():
    buf = torch.zeros(2 * 3 * 4 * (2 + 4) + 4 * 2 * 3, dtype=torch.uint8)
    values, indices, lse = P.packed_views(buf, 2, 3, 4, "bfloat16")
    assert (values.shape, indices.shape, lse.shape) == ((2, 3, 4), (2, 3, 4), (2, 3))
    header = PayloadHeader(k=4, temperature=1.0, vocab_size=100, batch=2, seq_len=3, values_dtype="bfloat16")
    assert P.is_packed_in(TopKPayload(values, indices, lse, header), buf)
    assert not P.is_packed_in(TopKPayload(values.clone(), indices, lse, header), buf)  # a copy elsewhere
    assert not P.is_packed_in(TopKPayload(values, indices, lse, header), torch.zeros_like(buf))
    unpacked = P.unpack_payload(buf, header)  # the student's views of a received buffer: the same layout
    assert unpacked.values.data_ptr() == values.data_ptr() and unpacked.lse.data_ptr() == lse.data_ptr()


def _members(protocol) -> dict:
    """A Protocol's methods and their parameter names (what its implementations must accept)."""
    import inspect

    return {name: list(inspect.signature(fn).parameters) for name, fn in vars(protocol).items()
            if inspect.isfunction(fn) and not name.startswith("_")}


@pytest.mark.parametrize("protocol, classes", [
    ("Channel", ["kd_teacher.transport.shm.ShmClient", "kd_teacher.transport.dist_client.DistClient"]),
    ("Endpoint", ["kd_teacher.transport.shm_server.ShmServer", "kd_teacher.transport.dist_server.DistServer"]),
])
def test_transport_ends_implement_their_protocol(protocol, classes):
    import importlib
    import inspect

    from kd_teacher.transport import channel

    for path in classes:
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        for member, params in _members(getattr(channel, protocol)).items():
            assert list(inspect.signature(getattr(cls, member)).parameters)[1:] == params[1:], (path, member)


@pytest.mark.parametrize("expect", [{"k": "8"}, {"temperature": "hot"}, {"vocab_size": True}, {"k": [8]}])
def test_hello_expectation_of_the_wrong_json_types_is_a_protocol_error(expect):
    """Compared later as numbers (float(temperature)): refused at the door instead, naming the field."""
    field = next(iter(expect))
    with pytest.raises(P.ProtocolError, match=f"field {field}="):
        P.student_expectation({"expect": expect})


def test_server_info_with_an_unknown_values_dtype_is_refused_naming_the_known_ones():
    text = INFO.to_json().replace('"float32"', '"float64"')
    with pytest.raises(P.ProtocolError, match="values dtype 'float64' is not one of \\['float32', 'bfloat16'"):
        P.ServerInfo.from_json(text)
