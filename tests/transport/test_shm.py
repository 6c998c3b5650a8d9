"""Shared-memory rings in one process: owner-only files, slot checksums, oversize requests, handshake refusal.

The server end runs its real poll loop on a thread; payloads are real top-k extractions of random logits
(this file tests the transport; the end-to-end tests with a Megatron teacher are in test_stream.py).
"""

import os
import stat
import threading
import uuid

import pytest
import torch

from kd_teacher.payload import TopKPayload
from kd_teacher.transport import protocol as P
from kd_teacher.transport import shm

INFO = P.ServerInfo(vocab_size=1000, k=4, temperature=1.0, values_dtype="float32", teacher_fingerprint="t",
                    recipe_fingerprint="r", max_tokens_per_request=64, max_seq_len=32)


class EchoTeacher:
    """ShmServer's poll loop on a thread, answering each request with the top-k of seeded random logits."""

    def __init__(self, name):
        self.server = shm.ShmServer(name, INFO)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            for item in self.server.poll(0.05):
                if isinstance(item, P.Request):
                    logits = torch.randn(*item.tokens.shape, 1000, generator=torch.Generator().manual_seed(item.seq))
                    payload = TopKPayload.from_logits(logits, 4, tokens=item.tokens, sample_ids=item.sample_ids,
                                                      teacher_fingerprint="t", recipe_fingerprint="r")
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


def _client(name, **kw):
    kw = {"slots": 2, "connect_timeout_s": 5.0, "heartbeat_timeout_s": 2.0, **kw}
    return shm.ShmClient(name, 0, P.Expectation(k=4, vocab_size=1000), **kw)


def test_segments_are_owner_only_and_payloads_round_trip(teacher):
    client = _client(teacher.server.name)
    try:
        for path in (teacher.server.path, client.path):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        tokens = torch.randint(0, 1000, (2, 7))
        client.send(1, tokens, [5, 6], None, deadline=1e18)
        seq, payload, error = client.receive(float("inf"), lambda s: (2, 7))
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


def test_corrupt_slot_is_detected_not_decoded(teacher):
    client = _client(teacher.server.name)
    try:
        tokens = torch.randint(0, 1000, (1, 5))
        teacher.stop.set()
        teacher.thread.join()  # nobody consumes: we corrupt the reply slot the server writes next
        client.send(1, tokens, None, None, deadline=1e18)
        item = teacher.server.poll(1.0)[0]
        logits = torch.randn(1, 5, 1000)
        teacher.server.reply(item.student, item.seq, TopKPayload.from_logits(logits, 4, tokens=tokens,
                                                                             teacher_fingerprint="t",
                                                                             recipe_fingerprint="r"))
        at = client.rep._slot(1) + shm._SLOT_HEADER + 100
        client.mm[at] = client.mm[at] ^ 0xFF
        with pytest.raises(P.ProtocolError, match="corrupt"):
            client.receive(float("inf"), lambda s: (1, 5))
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


def test_student_expecting_another_k_is_refused_at_connect(teacher):
    with pytest.raises(P.IncompatibleTeacherError, match="k: the student expects 8"):
        shm.ShmClient(teacher.server.name, 0, P.Expectation(k=8), slots=2, connect_timeout_s=5,
                      heartbeat_timeout_s=2)


def test_second_server_with_a_live_name_is_refused(teacher):
    with pytest.raises(RuntimeError, match="another teacher server"):
        shm.ShmServer(teacher.server.name, INFO)
