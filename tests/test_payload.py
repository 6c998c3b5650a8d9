"""TopKPayload: exact round trips through bytes and tensors, refusal of tampered or malformed payloads."""

import json

import pytest
import torch

from kd_teacher import PayloadError, TokenMismatchError, TopKPayload
from kd_teacher.payload import token_hashes


def _payload(dtype=torch.bfloat16, k=5, temperature=2.0):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 300, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, 300, (2, 7), generator=g)
    return TopKPayload.from_logits(logits, k, temperature=temperature, vocab_size=290, tokens=tokens,
                                   sample_ids=[11, 12], request_id="r1", teacher_fingerprint="t",
                                   recipe_fingerprint="bf16:x"), tokens, logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_round_trip_is_exact(dtype):
    p, tokens, _ = _payload(dtype)
    q = TopKPayload.from_bytes(p.to_bytes())
    assert q.header == p.header
    assert torch.equal(q.values, p.values) and q.values.dtype == dtype
    assert torch.equal(q.indices, p.indices) and torch.equal(q.lse, p.lse)
    q.check_tokens(tokens, sample_ids=[11, 12])


def test_tensor_round_trip_is_exact():
    p, _, _ = _payload()
    tensors, header = p.to_tensors()
    q = TopKPayload.from_tensors(tensors, header)
    assert q.header == p.header and torch.equal(q.values, p.values)


def test_log_probs_and_lse_match_dense():
    p, _, logits = _payload(torch.float32)
    dense = torch.log_softmax(logits[..., :290].double() / 2.0, dim=-1)
    ref = torch.gather(dense, -1, p.indices.long())
    torch.testing.assert_close(p.log_probs().double(), ref, rtol=1e-5, atol=1e-5)


def _tamper_header(buf: bytes, edit) -> bytes:
    hlen = int.from_bytes(buf[4:12], "little")
    header = json.loads(buf[12 : 12 + hlen])
    edit(header)
    new = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return buf[:4] + len(new).to_bytes(8, "little") + new + buf[12 + hlen :]


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.update(temperature=1.0),
        lambda h: h.update(sample_ids=[1, 2]),
        lambda h: h["token_hashes"].reverse(),
        lambda h: h.update(teacher_fingerprint="other"),
    ],
)
def test_tampered_header_is_refused(edit):
    p, _, _ = _payload()
    with pytest.raises(PayloadError, match="checksum"):
        TopKPayload.from_bytes(_tamper_header(p.to_bytes(), edit))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h.update(k=10**9), "larger than its vocab|implies"),
        (lambda h: h.update(seq_len=10**12), "implies"),
        (lambda h: h.update(schema_version=99), "schema version"),
        (lambda h: h.update(extra=1), "unknown fields"),
        (lambda h: h.update(values_dtype="int8"), "values dtype"),
    ],
)
def test_absurd_or_unknown_headers_refused_before_allocation(edit, match):
    p, _, _ = _payload()
    with pytest.raises(PayloadError, match=match):
        TopKPayload.from_bytes(_tamper_header(p.to_bytes(), edit))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h.update(token_hashes=5), "token hashes"),
        (lambda h: h.update(token_hashes=[1, 2]), "token hashes"),
        (lambda h: h.update(values_dtype=["bfloat16"]), "values dtype"),
        (lambda h: h.update(sample_ids="ab"), "sample ids"),
        (lambda h: h.update(sample_ids=[[1], {}]), "sample ids"),
        (lambda h: h.update(request_id={"a": 1}), "request_id"),
        (lambda h: h.update(teacher_fingerprint=7), "teacher_fingerprint"),
        (lambda h: h.update(extraction=[]), "extraction"),
    ],
)
def test_header_fields_of_the_wrong_json_type_are_payload_errors(edit, match):
    """A transport hands PayloadHeader.from_dict a parsed JSON object from another process: wrong types are
    PayloadErrors naming the field, not TypeErrors further on."""
    from kd_teacher.payload import PayloadHeader

    header = json.loads(_payload()[0].header.to_json())
    edit(header)
    with pytest.raises(PayloadError, match=match):
        PayloadHeader.from_dict(header)


def test_header_nested_too_deep_for_the_parser_is_a_payload_error():
    from kd_teacher.payload import PayloadHeader

    with pytest.raises(PayloadError, match="RecursionError"):
        PayloadHeader.from_json('{"k": ' + "[" * 100_000 + "]" * 100_000 + "}")


def test_flipped_data_byte_is_refused():
    p, _, _ = _payload()
    buf = bytearray(p.to_bytes())
    buf[-40] ^= 0x01
    with pytest.raises(PayloadError, match="checksum"):
        TopKPayload.from_bytes(bytes(buf))


def test_float_token_ids_are_refused_not_truncated():
    """Ids 3.4 and 3 hash alike after a cast: a float batch must be an error wherever ids enter."""
    p, tokens, _ = _payload()
    for wrong in (tokens.float() + 0.4, tokens.double(), tokens.bool(), tokens.to(torch.complex64)):
        with pytest.raises(PayloadError, match="token ids must be integers"):
            p.check_tokens(wrong)
        with pytest.raises(PayloadError, match="token ids must be integers"):
            token_hashes(wrong)
    p.check_tokens(tokens.to(torch.int32))  # any integer dtype is fine


def test_other_tokens_are_refused():
    p, tokens, _ = _payload()
    other = tokens.clone()
    other[1, 3] += 1
    with pytest.raises(TokenMismatchError, match="1 of 2 sequences differ"):
        p.check_tokens(other)
    with pytest.raises(TokenMismatchError, match="sample ids"):
        p.check_tokens(tokens, sample_ids=[11, 13])


def test_validate_names_the_problem():
    p, _, _ = _payload(torch.float32)
    bad = TopKPayload(p.values, p.indices.clone(), p.lse, p.header)
    bad.indices[0, 0, 0] = 290
    with pytest.raises(PayloadError, match="outside the vocabulary"):
        bad.validate()
    bad = TopKPayload(p.values, p.indices, p.lse - 5.0, p.header)
    with pytest.raises(PayloadError, match="lse is smaller"):
        bad.validate()
    with pytest.raises(PayloadError, match="empty batch"):
        TopKPayload.from_logits(torch.randn(0, 3, 10), 2)


def test_rows_and_cat_keep_headers_consistent():
    p, tokens, _ = _payload()
    q = TopKPayload.cat([p.rows([1]), p.rows([0])])
    q.validate()
    q.check_tokens(tokens.flip(0), sample_ids=[12, 11])


def test_present_is_part_of_the_payload_and_survives_bytes_rows_and_cat():
    p, _, _ = _payload()
    p.header.present = [True, False]
    q = TopKPayload.from_bytes(p.to_bytes())  # what a tensor-parallel broadcast sends
    assert q.present.tolist() == [True, False] and q.to("cpu").present.tolist() == [True, False]
    assert q.rows([1, 0]).present.tolist() == [False, True]
    whole, _, _ = _payload()
    assert TopKPayload.cat([whole, q]).present.tolist() == [True, True, True, False]
    assert whole.present is None  # every sequence is the teacher's
    p.header.present = [True]
    with pytest.raises(PayloadError, match="'present' must be 2 true/false values"):
        TopKPayload.from_bytes(p.to_bytes())


def test_float64_logits_are_refused_naming_the_supported_dtypes():
    with pytest.raises(PayloadError, match="float64 cannot be served.*float32, bfloat16, float16"):
        TopKPayload.from_logits(torch.randn(1, 2, 10, dtype=torch.float64), 2)
    with pytest.raises(PayloadError, match="a \\[batch, seq, vocab\\] tensor, got list"):
        TopKPayload.from_logits([[1.0]], 2)


def test_bad_rows_of_a_payload_are_named():
    p, _, _ = _payload()
    with pytest.raises(PayloadError, match=r"rows \[2, -1\] are not sequence indices of a payload of 2 sequences"):
        p.rows([0, 2, -1])
