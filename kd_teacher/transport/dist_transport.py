"""torch.distributed transport: student ranks and teacher ranks of separate launches, two KD process groups.

Rank layout of both KD groups (size S + R): student rank i is KD rank i (i = its rank in the student's own
training world, 0..S-1); the head of teacher data-parallel replica r (its tensor- and pipeline-parallel rank
0) is KD rank S + r. Student i talks only to replica i % R; students never talk to each other, and teacher
ranks other than the heads are not in the groups (their head hands them the work over the teacher's own
model-parallel group). Each process already has a default world (its own torchrun job), so the groups are
built directly on a TCPStore at the KD rendezvous address, hosted by student rank 0.

  store     handshake (server info, hellos, verdicts), one heartbeat counter per replica; nothing per message
  requests  gloo, student -> teacher: a fixed-size request header, then the body (token ids, sample ids,
            request id) whose size the header gives (`dist_wire`). Gloo on the GPU too: a request is host data,
            and on its own group it cannot queue in front of replies (NCCL orders a pair's sends and receives
            on one stream per group, so a teacher's receive posted for a student's next request would hold
            back the replies to that student)
  data      NCCL on GPU (payloads stay on the GPU), gloo on CPU, teacher -> student: one reply per request,
            of a size both ends know from the request's shape and the handshake (`dist_wire.reply_layout`)

Per message, a student posts the receive of the reply when it sends the request (at most `max_outstanding`
posted; the request's own messages go out from a sending thread), so transfers run back to back as the
teacher sends; the reply's first block says whether it is a payload (its checked PayloadHeader) or an error,
and for which request. The teacher answers each student's requests in the order they arrived, always with
exactly one reply, so a student's receives stay in step.
The teacher (`dist_server.DistServer`) takes requests in on one thread (a gloo receive from any student, then
the body); replies go out from the serving thread. (Token hashes are the teacher's work, not the transport's:
the engine computes them while the forward runs.) This module has the student's end (`DistClient`) and what
both ends share.

Bounded waits: nothing waits without a deadline on the student's side. A posted NCCL receive is polled
(`is_completed`); gloo cannot be polled, and a gloo wait that times out closes its connection, so gloo
operations are waited for by a helper thread with no effective time limit and the caller polls that.
While it waits, a student checks the teacher's heartbeat: a dead or frozen teacher fails the wait with
TeacherUnavailableError after `heartbeat_timeout_s`, a slow one with TeacherTimeoutError at the request's
deadline. A timed-out request keeps its receive posted: its late reply arrives there and is discarded by
sequence number. A reply that is not the one expected (sequence number, size, header) is a ProtocolError,
and like a lost teacher it leaves the channel unusable (NCCL's receives are aborted): a restarted
torch.distributed teacher needs the students to reconnect; the shared-memory transport reattaches by itself.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from kd_teacher.payload import PayloadError, PayloadHeader
from kd_teacher.transport import dist_wire as W
from kd_teacher.transport import protocol as P

log = logging.getLogger(__name__)

TAG_REQUEST, TAG_BODY, TAG_REPLY = 1, 2, 3
_UNLIMITED_S = 30 * 86400.0  # gloo waits must not time out by themselves: a timed-out gloo wait closes the pair
_SEND_BACKLOG = 64  # replies a teacher keeps in flight before it waits for the oldest
_SPIN_S = 0.0002  # busy polling before sleeping: a reply is usually one transfer (tens of microseconds) away


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"KD rendezvous address {address!r} is not host:port")
    return host, int(port)


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


def _store(address: str, is_master: bool, timeout_s: float) -> dist.TCPStore:
    host, port = parse_address(address)
    return dist.TCPStore(host, port, None, is_master, _td(timeout_s), wait_for_workers=False)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def kd_groups(store, rank: int, size: int, backend: str, timeout_s: float):
    """(requests group, data group), outside the default world: all S + R members call this at connect."""
    requests = dist.ProcessGroupGloo(dist.PrefixStore("kd/req", store), rank, size, _td(timeout_s))
    prefix = dist.PrefixStore("kd/pg", store)
    if backend == "gloo":
        return requests, dist.ProcessGroupGloo(prefix, rank, size, _td(timeout_s))
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        # Our own polling bounds every wait; NCCL's watchdog would otherwise take the process down when a
        # receive stays posted longer than this (a slow teacher's late reply).
        opts._timeout = _td(max(timeout_s, 86400.0))
        return requests, dist.ProcessGroupNCCL(prefix, rank, size, opts)
    raise ValueError(f"KD backend {backend!r} is not gloo or nccl")


def _abort(pg) -> None:
    abort = getattr(pg, "abort", None)
    if abort is not None:
        try:
            abort()
        except Exception as e:  # noqa: BLE001 - already failing; the abort is best effort
            log.debug("aborting the KD data group failed: %s", e)


# ---- completion of posted operations ----------------------------------------------------------------------------
class _Op:
    """A posted send/recv and the tensors it uses (alive until it completed); `done()` never blocks."""

    __slots__ = ("work", "keep", "event", "error")

    def __init__(self, work, keep):
        self.work, self.keep, self.event, self.error = work, keep, None, None

    def done(self) -> bool:
        return self.event.is_set() if self.event is not None else self.work.is_completed()


class _GlooWaiter:
    """Waits for gloo operations in the order given, on its own thread, and flags each one when done.
    Gloo's works report completion only to `wait()`, and a timed-out wait closes the connection."""

    def __init__(self, name: str):
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def track(self, op: _Op) -> _Op:
        op.event = threading.Event()
        self.queue.put(op)
        return op

    def _run(self) -> None:
        while True:
            op = self.queue.get()
            if op is None:
                return
            try:
                op.work.wait(_td(_UNLIMITED_S))
            except Exception as e:  # noqa: BLE001 - handed to whoever polls this op
                op.error = e
            op.event.set()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5.0)


class _Sent:
    """One request's messages handed to the sending thread; `wait()` until they are out."""

    __slots__ = ("messages", "works", "error", "posted")

    def __init__(self, messages: list):
        self.messages, self.works, self.error = messages, [], None
        self.posted = threading.Lock()
        self.posted.acquire()  # released by the sending thread once it has posted them

    def wait(self, timeout_s: float) -> None:
        if not self.posted.acquire(timeout=timeout_s):
            raise TimeoutError(f"the request was not posted in {timeout_s} s")
        self.posted.release()
        if self.error is not None:
            raise self.error
        for work in self.works:
            work.wait(_td(timeout_s))
        self.messages = self.works = ()


class _RequestSender:
    """Posts requests (header, then body) to the teacher from a thread of its own, in order. Gloo writes a
    small message into the socket inside `send`: tens of microseconds a request that the student's thread
    need not spend."""

    def __init__(self, pg, teacher_rank: int):
        self.pg, self.teacher_rank = pg, teacher_rank
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="kd-request-sender", daemon=True)
        self.thread.start()

    def submit(self, messages: list) -> _Sent:
        job = _Sent(messages)
        self.queue.put(job)
        return job

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            try:
                job.works = [self.pg.send([tensor], self.teacher_rank, tag) for tensor, tag in job.messages]
            except Exception as e:  # noqa: BLE001 - handed to whoever waits for this request
                job.error = e
            job.posted.release()
            job = None  # holds no work while it waits for the next

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5.0)


def _poll(done: Callable[[], bool], deadline: float, between: Optional[Callable[[], None]] = None) -> bool:
    """Spin briefly, then sleep in growing steps, until done() or the deadline; `between` runs while asleep."""
    spin_until = time.monotonic() + _SPIN_S
    pause = 0.00005
    while not done():
        now = time.monotonic()
        if now >= deadline:
            return False
        if now < spin_until:
            continue
        if between is not None:
            between()
        time.sleep(min(pause, max(deadline - now, 0.0)))
        pause = min(pause * 2, 0.001)
    return True


class _Heartbeat:
    """Bumps the replica's heartbeat counter from its own thread and store connection."""

    def __init__(self, address: str, key: str, interval_s: float, timeout_s: float):
        self.store = _store(address, False, timeout_s)
        self.key, self.interval_s = key, interval_s
        self.lost: Optional[str] = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kd-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.store.add(self.key, 1)
            except Exception as e:  # noqa: BLE001 - the students' store is gone: they have left
                self.lost = str(e)
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)


def _device_for(backend: str, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


# ---- student side -----------------------------------------------------------------------------------------------
@dataclass
class _Posted:
    """A request sent and the posted receive of its reply."""

    seq: int
    shape: tuple
    block: int
    buf: torch.Tensor
    recv: _Op
    sent: Optional[_Sent]  # the request's two messages (their tensors stay alive until they are out)


class DistClient:
    """A student rank's end: hosts the KD store on rank 0, handshakes, joins the KD groups, moves messages."""

    def __init__(self, address: str, student: int, num_students: int, expect: P.Expectation, *,
                 backend: Optional[str] = None, connect_timeout_s: float = 600.0, heartbeat_timeout_s: float = 30.0,
                 device=None, max_outstanding: int = 8):
        self.student, self.num_students = student, num_students
        self.backend = backend or default_backend()
        self.device = _device_for(self.backend, device)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_outstanding = max(1, max_outstanding)
        self.broken: Optional[str] = None
        deadline = time.monotonic() + connect_timeout_s
        self.store = _store(address, student == 0, connect_timeout_s)
        self.store.set_timeout(_td(connect_timeout_s))
        self.info = self._handshake(address, expect, connect_timeout_s)
        self.replica = student % self.info.replicas
        self.teacher_rank = num_students + self.replica
        self.requests_pg, self.pg = kd_groups(self.store, student, num_students + self.info.replicas, self.backend,
                                              max(deadline - time.monotonic(), 1.0))
        self._waiter = _GlooWaiter("kd-recv-waiter") if self.backend == "gloo" else None
        self._sender = _RequestSender(self.requests_pg, self.teacher_rank)
        self._hb_key = f"kd/hb/{self.replica}"
        self._beat = (self.store.add(self._hb_key, 0), time.monotonic())
        self._checked = 0.0
        self._posted: collections.deque = collections.deque()
        self._early: collections.deque = collections.deque()  # replies taken in by send() to make room
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pinned: Optional[torch.Tensor] = None
        self._warm_up(deadline)

    def _handshake(self, address: str, expect: P.Expectation, timeout_s: float) -> P.ServerInfo:
        try:
            self.store.wait(["kd/server"])
        except Exception as e:  # noqa: BLE001
            raise P.TeacherUnavailableError(f"no teacher announced itself at {address} in {timeout_s} s") from e
        info = P.ServerInfo.from_json(self.store.get("kd/server"))
        problems = P.incompatibilities(info, expect)
        hello = {"num_students": self.num_students, "expect": json.loads(expect.to_json())}
        self.store.set(f"kd/hello/{self.student}", json.dumps(hello))
        if problems:
            raise P.IncompatibleTeacherError(f"teacher at {address} refused: " + "; ".join(problems))
        self.store.wait([f"kd/verdict/{self.student}"])
        verdict = json.loads(self.store.get(f"kd/verdict/{self.student}"))
        if not verdict["ok"]:
            raise P.IncompatibleTeacherError(f"teacher at {address} refused this student: {verdict['reason']}")
        return info

    def _warm_up(self, deadline: float) -> None:
        ping = torch.empty(4, dtype=torch.uint8, device=self.device)
        op = self._track(_Op(self.pg.recv([ping], self.teacher_rank, TAG_REPLY), ping))
        if not _poll(op.done, deadline) or op.error is not None:
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
        """Fail if the teacher's heartbeat stood still for heartbeat_timeout_s (checked every 20 ms at most)."""
        beat, seen = self._beat
        now = time.monotonic()
        if now - self._checked < 0.02:
            return
        self._checked = now
        try:
            current = self.store.add(self._hb_key, 0)
        except Exception as e:  # noqa: BLE001
            self._fail(f"the KD store is unreachable: {e}")
        if current != beat:
            self._beat = (current, now)
        elif now - seen > self.heartbeat_timeout_s:
            self._fail(f"teacher replica {self.replica} (KD rank {self.teacher_rank}) died or hangs: "
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
        block, total = W.reply_layout(b, s, len(rid), self.info)
        buf = torch.empty(total, dtype=torch.uint8, device=self.device)
        head = W.encode_request_header(W.KIND_REQUEST, self.student, seq, b, s, header.num_sample_ids, len(rid))
        body = W.encode_request_body(tokens.contiguous(), sample_ids, rid)
        try:
            # The receive first: the reply's transfer can start the moment the teacher sends it.
            recv = self._track(_Op(self.pg.recv([buf], self.teacher_rank, TAG_REPLY), buf))
        except Exception as e:  # noqa: BLE001
            self._fail(f"posting the receive of reply {seq} from teacher replica {self.replica} failed: {e}")
        sent = self._sender.submit([(head, TAG_REQUEST), (body, TAG_BODY)])
        self._posted.append(_Posted(seq, (b, s), block, buf, recv, sent))

    # ---- receiving ------------------------------------------------------------------------------------------
    def receive(self, deadline: float, shape_of: Callable[[int], Optional[tuple]] = None):
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
        if not _poll(head.recv.done, deadline, self._check_teacher):
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
        status, text = W.decode_block(self._block_bytes(head), head.seq, head.block)
        self._sends_done(head)
        if status != W.STATUS_OK:
            return head.seq, None, W.error_text(text)
        try:
            ph = PayloadHeader.from_json(text)
        except PayloadError as e:
            raise P.ProtocolError(f"reply payload header: {e}") from None
        P.check_payload_fits(ph, head.shape, self.info)
        payload = P.unpack_payload(head.buf[head.block:], ph)
        if self._copy_stream is not None:
            head.recv.work.wait()  # later work on this stream reads the payload after its receive
        return head.seq, payload, None

    def _block_bytes(self, head: _Posted) -> bytes:
        """The reply's first block on the host. On the GPU it is copied on a side stream that waits for the
        receive alone, so the host does not wait for the student's own queued work."""
        n = head.block
        if self._copy_stream is None:
            return bytes(head.buf[:n].numpy())
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, 4096), dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(self._copy_stream):
            head.recv.work.wait()
            self._pinned[:n].copy_(head.buf[:n], non_blocking=True)
        self._copy_stream.synchronize()
        return bytes(self._pinned[:n].numpy())

    def _sends_done(self, head: _Posted) -> None:
        # The teacher answered, so it took both messages in: this returns at once.
        try:
            head.sent.wait(60.0)
        except Exception as e:  # noqa: BLE001
            self._fail(f"request {head.seq} was answered but its sending failed: {e}")
        head.sent = None

    def close(self) -> None:
        if not self.broken:
            try:
                bye = W.encode_request_header(W.KIND_BYE, self.student, 0)
                self._sender.submit([(bye, TAG_REQUEST)]).wait(10.0)
                # Late replies to timed-out requests are still on their way: take them in, briefly.
                deadline = time.monotonic() + 5.0
                while self._posted and _poll(self._posted[0].recv.done, deadline):
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
