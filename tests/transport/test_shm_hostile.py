"""The shared-memory server against hostile or unlucky input (issue 25 items 7-8, issue 23 defect 5): malformed
request frames and hellos are answered with errors and the server goes on for everyone; a segment that is not
a server's, or whose server's pid is reused, is taken over cleanly; a request sent while the teacher is down
fails within its own timeout and says so; segments of killed servers and students are cleaned up."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from kd_teacher.transport import protocol as P
from kd_teacher.transport import shm, shm_server
from kd_teacher.transport.client import RemoteTeacher, RemoteTeacherConfig

from .test_shm import EchoTeacher, _client

ROOT = Path(__file__).resolve().parents[2]
# Room for a 100k-deep JSON frame in one request slot (slot_sizes grows with max_tokens_per_request).
BIG = P.ServerInfo(vocab_size=1000, k=4, temperature=1.0, values_dtype="float32", teacher_fingerprint="t",
                   recipe_fingerprint="r", max_tokens_per_request=4096, max_seq_len=32)


def _send_raw(client, seq: int, meta: bytes, buffers=()):
    """A frame as a (broken) student would write it, registered as request `seq` like ShmClient.send does."""
    client._slot_seqs[client.req.written() + 1] = seq
    client.req.put(meta + b" " * (-len(meta) % 64), list(buffers))


def test_malformed_request_frames_get_error_replies_and_the_server_goes_on():
    teacher = EchoTeacher(f"t-{uuid.uuid4().hex[:8]}", BIG)
    client = _client(teacher.server.name, slots=8)
    try:
        deep = b'{"buffers":[],"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        _send_raw(client, 1, deep)  # RecursionError in the JSON parser
        _send_raw(client, 2, b'[1,2,3]')  # not an object
        ok = {"type": "request", "student": 0, "shape": [2, 5], "sample_ids": None, "request_id": None}
        four = torch.zeros(2, 4, dtype=torch.long)  # 8 ids for a [2, 5] shape
        _send_raw(client, 3, shm._meta(dict(ok, seq=3), [four.numel() * 8]), [four])
        _send_raw(client, 4, shm._meta(dict(ok, seq=4, shape="2x5"), [80]), [torch.zeros(10, dtype=torch.long)])
        _send_raw(client, 5, shm._meta(dict(ok, seq=5, sample_ids=[[1], {}]), [80]), [torch.zeros(10, dtype=torch.long)])
        _send_raw(client, 6, shm._meta(dict(ok, seq="six"), [80]), [torch.zeros(10, dtype=torch.long)])
        tokens = torch.randint(0, 1000, (2, 5))
        client.send(7, tokens, None, None, deadline=1e18)
        replies = {}
        while len(replies) < 7:
            seq, payload, error = client.receive(time.monotonic() + 10)
            replies[seq] = (payload, error)
        assert "RecursionError" in replies[1][1] and "not an object" in replies[2][1]
        assert "bytes for a" in replies[3][1] and "is not [batch, seq]" in replies[4][1]
        assert "sample ids" in replies[5][1] and "student/seq" in replies[6][1]
        payload, error = replies[7]
        assert error is None
        payload.check_tokens(tokens)
        assert teacher.thread.is_alive()
    finally:
        client.close()
        teacher.close()


def test_malformed_hello_is_refused_by_verdict_and_the_server_attaches_the_next_student():
    teacher = EchoTeacher(f"t-{uuid.uuid4().hex[:8]}")
    path = shm.SHM_DIR / f"kdt-{teacher.server.name}.c0-{99999999}-deadbeef"
    try:
        mm, tmp = shm._create(path, shm._RINGS_AT)
        mm[0:8] = shm._CHANNEL_MAGIC
        shm._put_json(mm, shm._HELLO_AT, shm._HELLO_MAX, shm._HELLO_LEN, ["student", 0])
        tmp.rename(path)
        deadline = time.monotonic() + 10
        while shm._get(mm, shm._ATTACHED_GEN) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        verdict = shm._get_json(mm, shm._VERDICT_AT, shm._VERDICT_MAX, shm._VERDICT_LEN)
        assert verdict["ok"] is False and "hello is a JSON list" in verdict["reason"]
        mm.close()
        client = _client(teacher.server.name)
        try:
            tokens = torch.randint(0, 1000, (1, 3))
            client.send(1, tokens, None, None, deadline=1e18)
            assert client.receive(time.monotonic() + 10)[1] is not None
            assert teacher.thread.is_alive()
        finally:
            client.close()
    finally:
        path.unlink(missing_ok=True)
        teacher.close()


def test_a_file_that_is_no_server_segment_or_a_reused_pid_is_taken_over(monkeypatch):
    name = f"t-{uuid.uuid4().hex[:8]}"
    path = shm.server_path(name, 0)
    path.write_bytes(b"KDSH")  # shorter than any header field
    path.chmod(0o600)
    server = shm_server.ShmServer(name, shm_server.P.ServerInfo(**vars(BIG)))
    server.close()
    assert not path.exists()
    # A dead server whose pid is reused by the time it is looked at again: taken over, not an unbound variable.
    server = shm_server.ShmServer(name, BIG)
    server._stop.set()  # freeze its heartbeat, as a dead one's
    answers = iter([False, True, True])
    monkeypatch.setattr(shm_server, "_pid_alive", lambda pid: next(answers, False))
    successor = shm_server.ShmServer(name, BIG)
    successor.close()
    server.close()


def test_request_while_the_teacher_is_down_fails_within_its_timeout_and_is_logged(caplog):
    teacher = EchoTeacher(f"t-{uuid.uuid4().hex[:8]}")
    remote = RemoteTeacher(RemoteTeacherConfig(transport="shm", name=teacher.server.name, student_rank=0,
                                               connect_timeout_s=120, timeout_s=1.5, heartbeat_timeout_s=1.0))
    try:
        tokens = torch.randint(0, 1000, (1, 4))
        remote.score(tokens)
        teacher.close()
        with pytest.raises(P.TeacherUnavailableError):
            remote.score(tokens)  # the teacher went away: the request in flight fails
        start = time.monotonic()
        with caplog.at_level(logging.WARNING), pytest.raises(P.TeacherUnavailableError):
            remote.score(tokens)  # sent while it is down: its own 1.5 s, not connect_timeout_s
        assert time.monotonic() - start < 6.0
        assert "waiting for it" in caplog.text
    finally:
        remote.close()


_SERVER_CHILD = """
import sys, time
from kd_teacher.transport import protocol as P
from kd_teacher.transport.shm_server import ShmServer
info = P.ServerInfo(vocab_size=1000, k=4, temperature=1.0, values_dtype="float32", teacher_fingerprint="t",
                    recipe_fingerprint="r", max_tokens_per_request=64, max_seq_len=32)
server = ShmServer(sys.argv[1], info)
print("up", flush=True)
while True:
    server.poll(0.05)
"""

_STUDENT_CHILD = """
import sys
from kd_teacher.transport.client import RemoteTeacher, RemoteTeacherConfig
remote = RemoteTeacher(RemoteTeacherConfig(transport="shm", name=sys.argv[1], student_rank=3, connect_timeout_s=60))
print("up", flush=True)
sys.stdin.read()
"""


def _child(code: str, name: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, name], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


def test_segments_of_killed_servers_and_students_are_removed():
    """A SIGKILLed server's segment goes with the close() of a student that was attached to it; the channel of a
    student SIGKILLed while no server ran goes when a server of that name starts (a running server drops the
    channels of students that die, as before)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    server = _child(_SERVER_CHILD, name)
    try:
        client = _client(name)
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert shm.server_path(name, 0).exists()
        client.close()
        assert not list(shm.SHM_DIR.glob(f"kdt-{name}.*"))

        live = EchoTeacher(name)
        student = _child(_STUDENT_CHILD, name)
        channel = next(shm.SHM_DIR.glob(f"kdt-{name}.c3-*"))
        live.close()  # the student dies while no server runs: nobody notices it
        student.send_signal(signal.SIGKILL)
        student.wait()
        assert channel.exists()
        EchoTeacher(name).close()
        assert not channel.exists()
    finally:
        if server.poll() is None:
            server.kill()
        for path in shm.SHM_DIR.glob(f"kdt-{name}.*"):
            path.unlink()
