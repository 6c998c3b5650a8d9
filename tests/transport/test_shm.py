"""Shared-memory rings in one process: owner-only files, the seqlock and slot-header hash (torn, stale and
rewritten slots are never taken for a message), the optional data crc, one-copy replies, oversize requests,
handshake refusal.

The server end runs its real poll loop on a thread; payloads are real top-k extractions of random logits
(this file tests the transport; the end-to-end tests with a Megatron teacher are in test_stream.py).
"""

import os
import stat
import threading
import uuid

import pytest
import torch

from kd_teacher.contract import TeacherContract
from kd_teacher.payload import DTYPES, TopKPayload
from kd_teacher.transport import protocol as P
from kd_teacher.transport import shm, shm_server

INFO = P.ServerInfo(vocab_size=1000, k=4, temperature=1.0, values_dtype="float32", teacher_fingerprint="t",
                    recipe_fingerprint="r", max_tokens_per_request=64, max_seq_len=32)


class EchoTeacher:
    """ShmServer's poll loop on a thread, answering each request with the top-k of seeded random logits."""

    def __init__(self, name, info=INFO):
        self.info = info
        self.sent = {}  # seq -> the payload the server replied with
        self.server = shm_server.ShmServer(name, info)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            for item in self.server.poll(0.05):
                if isinstance(item, P.Request):
                    logits = torch.randn(*item.tokens.shape, 1000, generator=torch.Generator().manual_seed(item.seq))
                    payload = TopKPayload.from_logits(logits.to(DTYPES[self.info.values_dtype]), self.info.k,
                                                      tokens=item.tokens, sample_ids=item.sample_ids,
                                                      teacher_fingerprint="t", recipe_fingerprint="r")
                    self.sent[item.seq] = payload
                    self.server.reply(item.student, item.seq, payload)
                else:
                    self.server.reply(item[0], item[1], error=item[2])

    def close(self):
        self.stop.set()
        self.thread.join()
        self.server.close()


@pytest.fixture
def teacher():
    t = EchoTeacher(f"t-{uuid.uuid4().hex[:8]}")
    yield t
    t.close()


def _client(name, k=4, **kw):
    kw = {"slots": 2, "connect_timeout_s": 5.0, "heartbeat_timeout_s": 2.0, **kw}
    return shm.ShmClient(name, 0, TeacherContract(k=k, vocab_size=1000), **kw)


def test_segments_are_owner_only_and_payloads_round_trip(teacher):
    client = _client(teacher.server.name)
    try:
        for path in (teacher.server.path, client.path):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        tokens = torch.randint(0, 1000, (2, 7))
        client.send(1, tokens, [5, 6], None, deadline=1e18)
        seq, payload, error = client.receive(float("inf"))
        assert (seq, error) == (1, None)
        payload.check_tokens(tokens, [5, 6])
        payload.validate()
    finally:
        client.close()
    assert not client.path.exists()


def test_segment_of_another_mode_is_refused(tmp_path):
    path = shm.SHM_DIR / f"kdt-perm-{uuid.uuid4().hex[:8]}.s0"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.fchmod(fd, 0o644)
    os.ftruncate(fd, 4096)
    os.close(fd)
    try:
        with pytest.raises(P.ProtocolError, match="0600"):
            shm._open_owned(path)
    finally:
        path.unlink()


def test_reply_is_one_copy_out_of_the_slot_bitwise_for_odd_sized_bf16():
    """bf16 values of an odd byte count go last, so indices and lse stay aligned in the one buffer the payload's
    tensors view; the payload does not alias the slot (it survives the slot being overwritten)."""
    info = P.ServerInfo(vocab_size=1000, k=3, temperature=1.0, values_dtype="bfloat16", teacher_fingerprint="t",
                        recipe_fingerprint="r", max_tokens_per_request=64, max_seq_len=32)
    teacher = EchoTeacher(f"t-{uuid.uuid4().hex[:8]}", info)
    client = _client(teacher.server.name, k=3)
    try:
        tokens = torch.randint(0, 1000, (1, 5))
        client.send(1, tokens, None, None, deadline=1e18)
        seq, payload, error = client.receive(float("inf"))
        sent = teacher.sent[seq]
        assert payload.values.dtype == torch.bfloat16 and payload.values.numel() * 2 % 4 == 2
        for got, want in ((payload.values, sent.values), (payload.indices, sent.indices), (payload.lse, sent.lse)):
            assert torch.equal(got, want)
        ptrs = {t.untyped_storage().data_ptr() for t in (payload.values, payload.indices, payload.lse)}
        assert len(ptrs) == 1  # one buffer, one copy
        at = client.rep._slot(1)
        client.rep.raw[at:at + client.rep.stride].fill_(0xAB)
        assert torch.equal(payload.values, sent.values) and torch.equal(payload.lse, sent.lse)
    finally:
        client.close()
        teacher.close()


def _stopped_teacher_reply(teacher, client, tokens):
    """The server's reply to one request, sitting unread in the client's reply ring (nobody else consumes)."""
    teacher.stop.set()
    teacher.thread.join()
    client.send(1, tokens, None, None, deadline=1e18)
    item = teacher.server.poll(1.0)[0]
    logits = torch.randn(*tokens.shape, 1000)
    teacher.server.reply(item.student, item.seq, TopKPayload.from_logits(
        logits, 4, tokens=tokens, teacher_fingerprint="t", recipe_fingerprint="r"))
    return client.rep._slot(1) + shm._SLOT_HEADER


def test_corrupt_slot_header_is_detected_not_decoded(teacher):
    client = _client(teacher.server.name)
    try:
        data = _stopped_teacher_reply(teacher, client, torch.randint(0, 1000, (1, 5)))
        client.mm[data + 100] ^= 0xFF  # inside the JSON header (payload header, token hashes)
        with pytest.raises(P.ProtocolError, match="corrupt .*slot header hash mismatch"):
            client.receive(float("inf"))
        assert not client.rep.pending()  # the slot was released: the channel goes on
    finally:
        client.close()


@pytest.mark.parametrize("verify_data", [False, True])
def test_data_crc_only_with_verify_data(teacher, verify_data):
    """The buffers' crc is the opt-in (the default relies on the seqlock); with it, a flipped data byte is caught."""
    client = _client(teacher.server.name, verify_data=verify_data)
    try:
        tokens = torch.randint(0, 1000, (1, 5))
        data = _stopped_teacher_reply(teacher, client, tokens)
        flags, crc = shm._SLOT.unpack_from(client.mm, data - shm._SLOT_HEADER)[4:]
        assert (flags, crc != 0) == ((1, True) if verify_data else (0, False))
        meta_len = shm._SLOT.unpack_from(client.mm, data - shm._SLOT_HEADER)[2]
        client.mm[data + meta_len + 7] ^= 0xFF  # a byte of the indices
        if verify_data:
            with pytest.raises(P.ProtocolError, match="data crc mismatch"):
                client.receive(float("inf"))
        else:
            seq, payload, _ = client.receive(float("inf"))
            assert seq == 1 and payload.indices.shape == (1, 5, 4)
    finally:
        client.close()


def _put_text(ring, text: str):
    ring.put(shm._meta({"text": text}, [4]), [torch.tensor([len(text)], dtype=torch.int32)])


def _text(header, views, data):
    return header["text"], int(data.view(torch.int32)[0])


def test_slot_being_written_is_waited_for_then_taken(teacher):
    client = _client(teacher.server.name)
    try:
        ring = client.rep  # this test is its producer (the teacher is idle)
        _put_text(ring, "hello")
        at = ring._slot(1)
        data = at + shm._SLOT_HEADER + shm._SLOT.unpack_from(client.mm, at)[2]
        # `written` is bumped but the producer's last stores are not visible yet: its data and its seq
        shm._put(client.mm, at, 0)
        client.mm[data:data + 4] = bytes(4)

        def finish():
            client.mm[data:data + 4] = (5).to_bytes(4, "little")
            shm._put(client.mm, at, 1)

        restore = threading.Timer(0.01, finish)
        restore.start()
        assert ring.take(_text, retry_s=2.0) == ("hello", 5)
        restore.join()
    finally:
        client.close()


def test_stale_slot_of_an_earlier_lap_is_never_taken(teacher):
    client = _client(teacher.server.name)  # 2 slots: message 3 goes where message 1 was
    try:
        ring = client.rep  # this test is its producer (the teacher is idle)
        for text in ("one", "two"):
            _put_text(ring, text)
            assert ring.take(_text)[0] == text
        shm._put(client.mm, ring.written_at, 3)  # counter says 3, the slot still holds message 1
        with pytest.raises(P.ProtocolError, match="message 3 is corrupt .*slot seq 1"):
            ring.take(_text, retry_s=0.02)
    finally:
        client.close()


def test_slot_rewritten_while_read_is_read_again(teacher):
    """A second writer (e.g. a replaced server that resumed) that touches the slot during the copy-out: the
    copy is discarded and the slot read again once it is whole."""
    client = _client(teacher.server.name)
    try:
        ring = client.rep  # this test is its producer (the teacher is idle)
        _put_text(ring, "first")
        at = ring._slot(1)
        reads = []

        def parse_while_rewritten(header, views, data):
            reads.append(header["text"])
            if len(reads) == 1:  # the other writer starts on the slot during our read ...
                shm._put(client.mm, at, 0)
                ring.view[at + shm._SLOT_HEADER:at + shm._SLOT_HEADER + 64] = b" " * 64
                threading.Timer(0.01, _put_text_at, (ring, at, 1, "second")).start()  # ... and finishes
            return header["text"]

        assert ring.take(parse_while_rewritten, retry_s=2.0) == "second"
        assert reads == ["first", "second"]
    finally:
        client.close()


def _put_text_at(ring, at, seq, text):
    """What another writer of message `seq` would leave in the slot."""
    written, consumed = shm._get(ring.mm, ring.written_at), shm._get(ring.mm, ring.consumed_at)
    shm._put(ring.mm, ring.written_at, seq - 1)
    _put_text(ring, text)
    shm._put(ring.mm, ring.written_at, written)
    assert ring._slot(seq) == at and shm._get(ring.mm, ring.consumed_at) == consumed


def test_round_trip_with_verify_data_both_directions(teacher):
    client = _client(teacher.server.name, verify_data=True)
    try:
        for seq in (1, 2, 3):
            tokens = torch.randint(0, 1000, (2, 9))
            client.send(seq, tokens, None, None, deadline=1e18)
            got, payload, error = client.receive(float("inf"))
            assert (got, error) == (seq, None)
            payload.check_tokens(tokens)
            assert shm._SLOT.unpack_from(client.mm, client.req._slot(seq))[4] == 1  # the request had its crc
    finally:
        client.close()


def test_oversize_request_is_refused_before_it_is_written(teacher):
    client = _client(teacher.server.name)
    try:
        with pytest.raises(P.RequestRejectedError, match="exceeds the channel"):
            client.send(1, torch.zeros(1, 100_000, dtype=torch.long), None, None, deadline=1e18)
        assert not client.req.pending()
    finally:
        client.close()


def test_remote_teacher_refuses_float_token_ids_as_the_engine_does(teacher):
    from kd_teacher.payload import PayloadError
    from kd_teacher.transport.client import RemoteTeacher, RemoteTeacherConfig

    remote = RemoteTeacher(RemoteTeacherConfig(transport="shm", name=teacher.server.name, student_rank=0,
                                               num_students=1, connect_timeout_s=5, heartbeat_timeout_s=2))
    try:
        tokens = torch.randint(0, 1000, (2, 5))
        with pytest.raises(PayloadError, match="token ids must be integers"):
            remote.score(tokens.float() + 0.4)
        assert not teacher.sent  # refused before it was sent
        assert remote.score(tokens).header.batch == 2
    finally:
        remote.close()


def test_student_expecting_another_k_is_refused_at_connect(teacher):
    with pytest.raises(P.IncompatibleTeacherError, match="k: the student expects 8"):
        shm.ShmClient(teacher.server.name, 0, TeacherContract(k=8), slots=2, connect_timeout_s=5,
                      heartbeat_timeout_s=2)


def test_second_server_with_a_live_name_is_refused(teacher):
    with pytest.raises(RuntimeError, match="another teacher server"):
        shm_server.ShmServer(teacher.server.name, INFO)


def test_student_reconnecting_from_the_same_process_is_attached_again(teacher):
    """A closed channel and its successor (same rank, same pid) are different files: the server, which may not
    have noticed the close yet, attaches the new one."""
    for attempt in range(3):
        client = _client(teacher.server.name)
        try:
            tokens = torch.randint(0, 1000, (1, 3))
            client.send(1, tokens, None, None, deadline=1e18)
            seq, payload, error = client.receive(float("inf"))
            assert (seq, error) == (1, None)
            payload.check_tokens(tokens)
        finally:
            client.close()


def test_held_payloads_never_change_across_later_replies_and_buffers_come_back_when_dropped(teacher):
    """A payload owns the buffer its tensors view (transport/buffers.py): later replies never land in a buffer
    that something still holds, be it the payload, one of its tensors or only their storage; dropped payloads'
    buffers are lent again (on the CPU), so a long run does not allocate per message."""
    client = _client(teacher.server.name)
    try:
        tokens = torch.randint(0, 1000, (2, 9))
        held, storages = [], []
        for seq in range(1, 25):
            client.send(seq, tokens, None, None, deadline=1e18)
            got, payload, _ = client.receive(float("inf"))
            if seq % 2:
                held.append((got, payload))
            else:  # only the storage of the lse: the values it holds must not change either
                storages.append((got, payload.lse.untyped_storage(), payload.lse.storage_offset()))
            del payload
        for got, payload in held:
            want = teacher.sent[got]
            assert torch.equal(payload.values, want.values) and torch.equal(payload.indices, want.indices)
            assert torch.equal(payload.lse, want.lse)
        for got, storage, offset in storages:
            lse = torch.empty(0).set_(storage, offset, teacher.sent[got].lse.shape)
            assert torch.equal(lse, teacher.sent[got].lse)
        assert client._buffers.allocated == 24  # nothing reused while held
        held.clear()
        storages.clear()
        for seq in range(25, 45):
            client.send(seq, tokens, None, None, deadline=1e18)
            got, payload, _ = client.receive(float("inf"))
            assert torch.equal(payload.values, teacher.sent[got].values)
        assert client._buffers.allocated == 24  # the dropped ones were lent again
    finally:
        client.close()


def test_cancelled_requests_free_their_in_flight_places_and_their_replies_are_discarded(teacher):
    from kd_teacher.transport import RemoteTeacher, RemoteTeacherConfig

    rt = RemoteTeacher(RemoteTeacherConfig(transport="shm", name=teacher.server.name, k=4, max_in_flight=2,
                                           student_rank=0, num_students=1, timeout_s=10, connect_timeout_s=5))
    try:
        given_up = [rt.submit(torch.randint(0, 1000, (1, 8))) for _ in range(2)]
        assert rt.in_flight == 2
        for handle in given_up:
            rt.cancel(handle)
        assert rt.in_flight == 0  # a further submit does not wait for the abandoned replies
        tokens = [torch.randint(0, 1000, (1, 8)) for _ in range(2)]
        handles = [rt.submit(t) for t in tokens]
        for t, h in zip(tokens, handles):
            rt.result(h).check_tokens(t)
        assert rt.stale_discarded == 2
        with pytest.raises(KeyError):
            rt.result(given_up[0])
    finally:
        rt.close()
