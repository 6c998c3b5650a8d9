"""torch.distributed transport, the student's end: `DistClient` (the teacher's is `dist_server.DistServer`; the
groups, the wire and what both ends share are in `dist_transport`, whose docstring describes the layout).

Bounded waits: nothing waits without a deadline on the student's side. A posted NCCL receive is polled
(`is_completed`); gloo cannot be polled, and a gloo wait that times out closes its connection, so gloo
operations are waited for by a helper thread with no effective time limit and the caller blocks on that
thread's lock in slices.
While it waits, a student checks the teacher's heartbeat: a dead or frozen teacher fails the wait with
TeacherUnavailableError after `heartbeat_timeout_s`, a slow one with TeacherTimeoutError at the request's
deadline. A timed-out request keeps its receive posted: its late reply arrives there and is discarded by
sequence number. A reply that is not the one expected (sequence number, size, header) is a ProtocolError,
and like a lost teacher it leaves the channel unusable (NCCL's receives are aborted): a restarted
torch.distributed teacher needs the students to reconnect; the shared-memory transport reattaches by itself.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch

from kd_teacher.contract import TeacherContract
from kd_teacher.transport import dist_wire as W
from kd_teacher.transport import protocol as P
from kd_teacher.transport import reply_block as RB
from kd_teacher.transport.buffers import HostBuffers
from kd_teacher.transport.dist_transport import (
    PAIR_STUDENT,
    PAIR_TEACHER,
    TAG_REPLY,
    TAG_REQUEST,
    _abort,
    _device_for,
    _GlooWaiter,
    _Op,
    _Sender,
    _SendJob,
    _store,
    _td,
    default_backend,
    pair_groups,
)

log = logging.getLogger(__name__)

_HEARTBEAT_CHECK_S = 0.02  # a waiting student's receive wakes this often (a local wait, no store traffic)


def heartbeat_read_interval(heartbeat_timeout_s: float) -> float:
    """How often a waiting student reads the teacher's heartbeat from the KD store: a tenth of the timeout,
    between 20 ms and 1 s. The store lives on the teacher (replica 0's head) and serves every student, so a
    fixed 20 ms cost it 50 operations a second per waiting student (3,200/s for 64 students); a tenth of the
    timeout still declares a dead teacher within 1.1 x heartbeat_timeout_s."""
    return min(1.0, max(0.02, heartbeat_timeout_s / 10.0))


@dataclass
class _Posted:
    """A request sent and the posted receive of its reply."""

    seq: int
    shape: tuple
    request_id: Optional[str]
    block: int
    buf: torch.Tensor
    recv: _Op
    sent: Optional[_SendJob]  # the request's message (its tensor stays alive until it is out)


class DistClient:
    """A student rank's end: handshakes on the teacher's KD store, forms its pair of groups with the head of its
    replica, moves messages. `num_students` is advisory (logged by the teacher): students join one by one."""

    def __init__(self, address: str, student: int, num_students: Optional[int], expect: TeacherContract, *,
                 backend: Optional[str] = None, connect_timeout_s: float = 600.0, heartbeat_timeout_s: float = 30.0,
                 device=None, max_outstanding: int = 8):
        self.student, self.num_students = student, num_students
        self.backend = backend or default_backend()
        self.device = _device_for(self.backend, device)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_outstanding = max(1, max_outstanding)
        self.broken: Optional[str] = None
        deadline = time.monotonic() + connect_timeout_s
        try:
            self.store = _store(address, False, connect_timeout_s)
        except Exception as e:  # noqa: BLE001 - TCPStore retries until its timeout, then raises its own error
            raise P.TeacherUnavailableError(f"no teacher's KD store at {address} in {connect_timeout_s} s: {e}") from e
        self.store.set_timeout(_td(connect_timeout_s))
        self.info, self.generation = self._handshake(address, expect, connect_timeout_s)
        self.replica = student % self.info.replicas
        self.teacher_rank = PAIR_TEACHER
        try:
            self.requests_pg, self.pg = pair_groups(self.store, student, self.generation, PAIR_STUDENT, self.backend,
                                                    max(deadline - time.monotonic(), 1.0))
        except Exception as e:  # noqa: BLE001 - gloo's and NCCL's own errors name no teacher
            raise P.TeacherUnavailableError(f"the KD groups with teacher replica {self.replica} at {address} did "
                                            f"not form: {e}") from e
        self._waiter = _GlooWaiter("kd-recv-waiter") if self.backend == "gloo" else None
        self._sender = _Sender(self.requests_pg, wait_sends=True, name="kd-request-sender")
        self._hb_key = f"kd/hb/{self.replica}"
        self._beat = (self.store.add(self._hb_key, 0), time.monotonic())
        self._checked = 0.0
        self._read_every = heartbeat_read_interval(heartbeat_timeout_s)
        self._posted: collections.deque = collections.deque()
        self._early: collections.deque = collections.deque()  # replies taken in by send() to make room
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pinned: Optional[torch.Tensor] = None
        self._buffers = HostBuffers(self.device)
        self._warm_up(deadline)

    def _handshake(self, address: str, expect: TeacherContract, timeout_s: float) -> tuple[P.ServerInfo, int]:
        """(the server's info, this process's generation). The hello goes under a generation of its own (one
        more than the last process of this rank had), and its (rank, generation) is appended to the store's
        join log, which the teacher's heads poll: a restarted student is a new generation, whose groups replace
        the old process's."""
        try:
            self.store.wait(["kd/server"])
        except Exception as e:  # noqa: BLE001
            raise P.TeacherUnavailableError(f"no teacher announced itself at {address} in {timeout_s} s") from e
        info = P.ServerInfo.from_json(self.store.get("kd/server"))
        problems = P.incompatibilities(info, expect)
        generation = int(self.store.add(f"kd/gen/{self.student}", 1))
        hello = {"num_students": self.num_students, "generation": generation, "expect": json.loads(expect.to_json())}
        self.store.set(f"kd/hello/{self.student}/{generation}", json.dumps(hello))
        joined = int(self.store.add("kd/joins", 1))
        self.store.set(f"kd/join/{joined}", f"{self.student}/{generation}")
        if problems:  # announced all the same: the teacher logs the refusal too
            raise P.IncompatibleTeacherError(f"teacher at {address} refused: " + "; ".join(problems))
        verdict_key = f"kd/verdict/{self.student}/{generation}"
        try:
            self.store.wait([verdict_key])
        except Exception as e:  # noqa: BLE001
            raise P.TeacherUnavailableError(f"teacher replica {self.student % info.replicas} at {address} did not "
                                            f"answer this student's hello in {timeout_s} s") from e
        verdict = json.loads(self.store.get(verdict_key))
        if not verdict["ok"]:
            raise P.IncompatibleTeacherError(f"teacher at {address} refused this student: {verdict['reason']}")
        return info, generation

    def _warm_up(self, deadline: float) -> None:
        ping = torch.empty(4, dtype=torch.uint8, device=self.device)
        op = self._track(_Op(self.pg.recv([ping], self.teacher_rank, TAG_REPLY), ping))
        if not op.wait(deadline - time.monotonic()) or op.error is not None:
            _abort(self.pg)
            raise P.TeacherUnavailableError(f"teacher replica {self.replica} did not complete the KD warm-up: "
                                            f"{op.error or 'timed out'}")

    def _track(self, op: _Op) -> _Op:
        return self._waiter.track(op) if self._waiter is not None else op

    def _fail(self, message: str, cls=P.TeacherUnavailableError):
        self.broken = message
        if self.backend == "nccl" and self._posted:
            _abort(self.pg)  # its posted receives would otherwise wait forever
        raise cls(message)

    def _check_teacher(self) -> None:
        """Fail if the teacher's heartbeat stood still for heartbeat_timeout_s (read every
        heartbeat_read_interval at most)."""
        beat, seen = self._beat
        now = time.monotonic()
        if now - self._checked < self._read_every:
            return
        self._checked = now
        try:
            current = self.store.add(self._hb_key, 0)
        except Exception as e:  # noqa: BLE001
            self._fail(f"the KD store is unreachable: {e}")
        if current != beat:
            self._beat = (current, now)
        elif now - seen > self.heartbeat_timeout_s:
            self._fail(f"teacher replica {self.replica} died or hangs: "
                       f"no heartbeat for {now - seen:.1f} s")

    # ---- sending --------------------------------------------------------------------------------------------
    def send(self, seq: int, tokens: torch.Tensor, sample_ids, request_id, deadline: float) -> None:
        if self.broken:
            raise P.TeacherUnavailableError(f"the KD channel is unusable: {self.broken}")
        rid = request_id.encode() if request_id else b""
        b, s = tokens.shape
        header = W.RequestHeader(W.KIND_REQUEST, self.student, seq, b, s, len(sample_ids or ()), len(rid))
        refused = W.refusal(header, self.info)
        if refused is not None:
            raise P.RequestRejectedError(f"not sent: {refused}")
        while len(self._posted) >= self.max_outstanding:
            item = self._receive_next(deadline)
            if item is None:
                raise P.TeacherTimeoutError(f"{len(self._posted)} requests are still unanswered at the deadline")
            self._early.append(item)
        block, total = W.reply_layout(b, s, self.info)
        buf = self._buffers.take(total)
        message = W.encode_request(self.student, seq, tokens, sample_ids, rid)  # makes its own int64 copy
        try:
            # The receive first: the reply's transfer can start the moment the teacher sends it.
            recv = self._track(_Op(self.pg.recv([buf], self.teacher_rank, TAG_REPLY), buf))
        except Exception as e:  # noqa: BLE001
            self._fail(f"posting the receive of reply {seq} from teacher replica {self.replica} failed: {e}")
        sent = self._sender.submit(message, self.teacher_rank, TAG_REQUEST)
        self._posted.append(_Posted(seq, (b, s), request_id, block, buf, recv, sent))

    # ---- receiving ------------------------------------------------------------------------------------------
    def receive(self, deadline: float):
        """(seq, payload, None) or (seq, None, error text) of the next reply, or None at the deadline."""
        if self._early:
            return self._early.popleft()
        return self._receive_next(deadline)

    def _receive_next(self, deadline: float):
        if self.broken:
            raise P.TeacherUnavailableError(f"the KD channel is unusable: {self.broken}")
        if not self._posted:
            time.sleep(max(0.0, min(deadline - time.monotonic(), 0.01)))
            return None
        head = self._posted[0]
        # Blocks (gloo) or polls (NCCL) in slices, looking at the teacher's heartbeat in between.
        while not head.recv.wait(min(deadline - time.monotonic(), _HEARTBEAT_CHECK_S)):
            self._check_teacher()
            if time.monotonic() >= deadline:
                return None
        self._posted.popleft()
        if head.recv.error is not None:
            self._fail(f"receiving the reply to request {head.seq} from teacher replica {self.replica} failed: "
                       f"{head.recv.error}")
        try:
            return self._take(head)
        except P.ProtocolError as e:
            self._fail(f"bad reply, the channel is out of step: {e}", P.ProtocolError)

    def _take(self, head: _Posted):
        ph, error = RB.decode(self._block_bytes(head), head.seq, head.shape, self.info, head.request_id)
        self._sends_done(head)
        if error is not None:
            return head.seq, None, error
        # No stream waits for the receive: it has completed on the GPU (`_receive_next` polled it), so any later
        # work reads the payload's bytes.
        return head.seq, P.unpack_payload(head.buf[head.block:], ph), None

    def _block_bytes(self, head: _Posted):
        """The reply's first block on the host. On the GPU it is copied on a side stream, so the host does not
        wait for the student's own queued work (the receive itself has completed)."""
        n = head.block
        if self._copy_stream is None:
            return memoryview(head.buf[:n].numpy())
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, 4096), dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(self._copy_stream):
            self._pinned[:n].copy_(head.buf[:n], non_blocking=True)
        self._copy_stream.synchronize()
        return memoryview(self._pinned[:n].numpy())

    def _sends_done(self, head: _Posted) -> None:
        # The teacher answered, so it took the request in: this returns at once.
        sent, head.sent = head.sent, None
        if not sent.wait(60.0) or sent.error is not None:
            self._fail(f"request {head.seq} was answered but its sending failed: {sent.error or 'not out in 60 s'}")

    def close(self) -> None:
        if not self.broken:
            try:
                bye = W.encode_request_header(W.KIND_BYE, self.student, 0)
                job = self._sender.submit(bye, self.teacher_rank, TAG_REQUEST)
                if not job.wait(10.0) or job.error is not None:
                    raise RuntimeError(f"goodbye not sent: {job.error or 'timed out'}")
                # Late replies to timed-out requests are still on their way: take them in, briefly.
                deadline = time.monotonic() + 5.0
                while self._posted and self._posted[0].recv.wait(deadline - time.monotonic()):
                    self._posted.popleft()
            except Exception as e:  # noqa: BLE001
                log.debug("closing the KD channel: %s", e)
        if self._posted and self.backend == "nccl":
            _abort(self.pg)
        self._posted.clear()
        self._sender.close()
        if self._waiter is not None:
            self._waiter.close()
        self.broken = self.broken or "closed"
