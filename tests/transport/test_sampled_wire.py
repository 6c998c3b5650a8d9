"""Sampled payloads on the streaming wire: the binary reply block carries the extraction, the payload buffers
round-trip exactly, and a student whose handshake says top-k refuses a sampled reply (and the reverse)."""

from dataclasses import replace

import pytest
import torch

from kd_teacher.payload import TopKPayload
from kd_teacher.transport import protocol as P
from kd_teacher.transport import reply_block as RB

SAMPLED = P.ServerInfo(vocab_size=1000, k=6, temperature=1.0, values_dtype="bfloat16", extraction="sampled",
                       teacher_fingerprint="t" * 64, recipe_fingerprint="r" * 16)


def _sampled_payload():
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 1000, (2, 5), generator=g)
    logits = torch.randn(2, 5, 1000, generator=g).bfloat16()
    return TopKPayload.from_logits(logits, 6, tokens=tokens, extraction="sampled", teacher_fingerprint="t" * 64,
                                   recipe_fingerprint="r" * 16)


def test_sampled_reply_round_trips_through_block_and_buffers():
    payload = _sampled_payload()
    assert payload.values.dtype == torch.bfloat16  # counts 0..6 in the logits' dtype
    ph, error = RB.decode(RB.encode_ok(3, RB.block_bytes(2), payload.header), 3, (2, 5), SAMPLED)
    assert error is None and ph.extraction == "sampled" and ph.token_hashes == payload.header.token_hashes
    got = P.unpack_payload(P.pack_payload(payload, "cpu"), ph).validate()
    assert torch.equal(got.values, payload.values) and torch.equal(got.indices, payload.indices)
    assert torch.equal(got.lse, payload.lse)


def test_a_reply_of_the_other_kind_is_refused():
    payload = _sampled_payload()
    topk = replace(SAMPLED, extraction="topk")
    with pytest.raises(P.ProtocolError, match="extraction: the handshake expects 'topk', the reply has 'sampled'"):
        RB.decode(RB.encode_ok(3, RB.block_bytes(2), payload.header), 3, (2, 5), topk)
