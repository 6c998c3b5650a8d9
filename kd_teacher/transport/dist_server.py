"""The teacher's end of the torch.distributed transport (`dist_transport` describes the design): the head of
one teacher data-parallel replica takes its students' requests in on a thread of its own and answers each
student's requests in the order they came, always with exactly one reply of the size the student expects.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kd_teacher.payload import TopKPayload
from kd_teacher.transport import dist_wire as W
from kd_teacher.transport import protocol as P
from kd_teacher.transport import reply_block as RB
from kd_teacher.transport.buffers import HostBuffers
from kd_teacher.transport.dist_transport import (
    _SEND_BACKLOG,
    _UNLIMITED,
    TAG_REPLY,
    TAG_REQUEST,
    _abort,
    _device_for,
    _Heartbeat,
    _Sender,
    _store,
    _td,
    default_backend,
    kd_groups,
)

log = logging.getLogger(__name__)

_REQUESTS_POSTED = 16  # request receives the teacher keeps posted


@dataclass
class _Expected:
    """What the reply to one received request must look like."""

    batch: int
    seq_len: int


class DistServer:
    """The head of teacher replica `replica`: joins the KD groups as rank S + replica and serves its students."""

    def __init__(self, address: str, info: P.ServerInfo, replica: int = 0, *, backend: Optional[str] = None,
                 connect_timeout_s: float = 600.0, heartbeat_interval_s: float = 0.1, device=None):
        self.address, self.info, self.replica = address, info, replica
        self.backend = backend or default_backend()
        self.device = _device_for(self.backend, device)
        self.store = _store(address, False, connect_timeout_s)
        if replica == 0:
            self.store.set("kd/server", info.to_json())
        self.num_students = self._admit_students(connect_timeout_s)
        R = info.replicas
        self.students = [i for i in range(self.num_students) if i % R == replica]
        self.requests_pg, self.pg = kd_groups(self.store, self.num_students + replica, self.num_students + R,
                                              self.backend, connect_timeout_s)
        # Replies go out from a thread of their own (`_Sender`); gloo sends are waited for there.
        self._sender = _Sender(self.pg, wait_sends=self.backend == "gloo", name="kd-reply-sender")
        self._buffers = HostBuffers(self.device)
        self._warm_up(connect_timeout_s)
        self._inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self._order = {s: collections.deque() for s in self.students}  # seqs in arrival order, not yet answered
        self._waiting = {s: collections.deque() for s in self.students}  # taken in, not yet handed to poll's caller
        self._expected: dict = {}  # (student, seq) -> _Expected
        self._held = {s: {} for s in self.students}  # replies ready before an earlier one of the same student
        self._staged: dict = {}  # (student, seq) -> reply buffer whose payload views `payload_views` handed out
        self._in_place_logged = False
        self._sends: collections.deque = collections.deque()  # _SendJob, in the order handed to the sender
        self._dropped: set[int] = set()  # no more requests taken from these (out of step)
        self._unreachable: set[int] = set()  # no more replies sent to these (a send failed)
        self._bye: set[int] = set()
        self._receiving: Optional[str] = None  # why the request thread stopped, once it has
        self._receiver = threading.Thread(target=self._receive_requests, name="kd-requests", daemon=True)
        self._receiver.start()
        self._beat = _Heartbeat(address, f"kd/hb/{replica}", heartbeat_interval_s, connect_timeout_s)
        log.info("KD replica %d serves students %s as KD rank %d of %d (%s)", replica, self.students,
                 self.num_students + replica, self.num_students + R, self.backend)

    def _admit_students(self, timeout_s: float) -> int:
        """Read every student's hello, judge it (replica 0 writes the verdicts), return S."""
        self.store.set_timeout(_td(timeout_s))
        self.store.wait(["kd/hello/0"])
        first = json.loads(self.store.get("kd/hello/0"))
        S = int(first["num_students"])
        keys = [f"kd/hello/{i}" for i in range(S)]
        self.store.wait(keys)
        refused = []
        for i, key in enumerate(keys):
            hello = json.loads(self.store.get(key))
            problems = P.incompatibilities(self.info, P.student_expectation(hello))
            if int(hello["num_students"]) != S:
                problems.append(f"num_students {hello['num_students']} != {S} (student 0's)")
            if self.replica == 0:
                self.store.set(f"kd/verdict/{i}", json.dumps({"ok": not problems, "reason": "; ".join(problems)}))
            if problems:
                refused.append(f"student {i}: " + "; ".join(problems))
        if refused:
            raise P.IncompatibleTeacherError("refused at connect, the KD group is not formed: " + " | ".join(refused))
        return S

    def _warm_up(self, timeout_s: float) -> None:
        """One small message to each student, so that NCCL sets up each pair's communicator now, under the
        connect timeout, and not inside the first request."""
        for student in self.students:
            ping = self._sender.submit(torch.ones(4, dtype=torch.uint8, device=self.device), student, TAG_REPLY)
            if not ping.wait(timeout_s) or ping.error is not None:
                raise P.TeacherUnavailableError(f"student {student} did not take the KD warm-up message in "
                                                f"{timeout_s} s: {ping.error or 'timed out'}")

    # ---- taking requests in (own thread) ----------------------------------------------------------------------
    def _receive_requests(self) -> None:
        # Several receives stay posted: a request that arrives while this thread waits for the GIL lands in one
        # of them at once (with none posted, gloo's event loop spins on the unread socket until one is).
        capacity = W.request_capacity(self.info)
        ring = [torch.empty(capacity, dtype=torch.uint8) for _ in range(_REQUESTS_POSTED)]
        posted = collections.deque((buf, self.requests_pg.recv_anysource([buf], TAG_REQUEST)) for buf in ring)
        try:
            while not set(self.students) <= (self._bye | self._dropped | self._unreachable):
                buf, work = posted.popleft()
                work.wait(_UNLIMITED)
                source = work._source_rank() if hasattr(work, "_source_rank") else work.source_rank()
                work = None
                item = self._take_request(source, buf)  # copies out what it keeps
                posted.append((buf, self.requests_pg.recv_anysource([buf], TAG_REQUEST)))
                if item is not None:
                    self._inbox.put(item)
        except Exception as e:  # noqa: BLE001 - the students' side of the group is gone
            self._receiving = f"{type(e).__name__}: {e}"
            log.info("KD replica %d stops taking requests: %s", self.replica, self._receiving)
        self._inbox.put(None)  # wakes the serving thread

    def _take_request(self, source: int, message: torch.Tensor):
        """A Request, (student, seq, error) for one to answer with an error, or None (nothing to answer)."""
        try:
            header = W.parse_request_header(bytes(message[:W.REQUEST_HEADER_BYTES].numpy()))
            if header.student != source or source not in self._order:
                raise P.ProtocolError(f"header of student {header.student} from KD rank {source}, which replica "
                                      f"{self.replica} serves: {source in self._order}")
        except P.ProtocolError as e:
            # Without a sequence number we trust, no reply can be matched to it: this student is out of step.
            log.warning("KD rank %d sent a malformed request header, no more requests taken from it: %s", source, e)
            self._dropped.add(source)
            return None
        if source in self._dropped:
            return None
        if header.kind == W.KIND_BYE:
            self._bye.add(source)
            return None
        self._expect(header)
        refused = W.refusal(header, self.info)
        if refused is not None:  # the claimed body does not even fit the message: an error-only reply
            log.warning("student %d: %s", source, refused)
            return source, header.seq, refused
        try:
            body = message[W.REQUEST_HEADER_BYTES:W.REQUEST_HEADER_BYTES + header.body_bytes]
            return W.decode_request_body(header, body, self.info)
        except P.RequestRejectedError as e:
            return source, header.seq, str(e)

    def _expect(self, header: W.RequestHeader) -> None:
        # Recorded before the request is handed on: the serving thread may answer it at once.
        self._expected[(header.student, header.seq)] = _Expected(header.batch, header.seq_len)
        self._order[header.student].append(header.seq)

    # ---- the serving thread's interface -----------------------------------------------------------------------
    def poll(self, timeout: float, max_requests: int = 64,
             allowance: Optional[Callable[[int], int]] = None) -> list:
        """Requests and (student, seq, error) triples that arrived within `timeout` (blocking on the first).
        `allowance(student)`: how many more of that student's requests the caller takes now; the rest wait here
        in arrival order."""
        self._reap()
        try:
            item = self._inbox.get(timeout=timeout) if not any(self._waiting.values()) else self._inbox.get_nowait()
            while item is not None:
                self._waiting[item.student if isinstance(item, P.Request) else item[0]].append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        out = []
        for student, waiting in self._waiting.items():
            room = min(max_requests - len(out), allowance(student) if allowance is not None else len(waiting))
            while waiting and room > 0:
                out.append(waiting.popleft())
                room -= 1
        return out

    def payload_views(self, student: int, seq: int):
        """(values, indices, lse) for the teacher to write its payload for request `seq` of `student` into, or
        None (no such request waiting, or an error-only reply). A payload made of exactly these tensors is sent
        from the buffer behind them with no copy: its reply block is written in front of it. Any other payload
        is copied into a reply buffer as usual."""
        expected = self._expected.get((student, seq))
        if expected is None or student in self._unreachable:
            return None
        block, total = W.reply_layout(expected.batch, expected.seq_len, self.info)
        if block == total:
            return None
        message = self._buffers.take(total)
        self._staged[(student, seq)] = message
        return P.packed_views(message[block:], expected.batch, expected.seq_len, self.info.k, self.info.values_dtype)

    def reply(self, student: int, seq: int, payload: Optional[TopKPayload] = None, error: Optional[str] = None):
        """Answer request `seq` of `student`; sent once the replies to its earlier requests are out."""
        expected = self._expected.pop((student, seq), None)
        staged = self._staged.pop((student, seq), None)
        if expected is None:
            log.warning("no request %d of student %d is waiting for a reply; dropped", seq, student)
            return
        if student in self._unreachable:
            return
        try:
            message = self._message(seq, expected, payload, error, staged)
        except Exception as e:  # noqa: BLE001 - a reply that cannot be built becomes an error reply
            log.exception("reply %d to student %d cannot be built", seq, student)
            message = self._message(seq, expected, None, f"the teacher failed to build the reply: {e}")
        self._held[student][seq] = message
        self._send_in_order(student)

    def _message(self, seq: int, expected: _Expected, payload: Optional[TopKPayload], error: Optional[str],
                 staged: Optional[torch.Tensor] = None):
        block, total = W.reply_layout(expected.batch, expected.seq_len, self.info)
        if error is None and payload is not None:
            error = self._mismatch(payload, expected)
        if error is None and payload is not None:
            try:
                head = RB.encode_ok(seq, block, payload.header)
            except ValueError as e:
                error = str(e)
            else:
                if staged is not None and P.is_packed_in(payload, staged[block:]):
                    message = staged  # the teacher wrote the payload in place: no copy
                    if not self._in_place_logged:
                        log.info("KD replica %d: replies go out of the buffers the engine wrote (no copy)",
                                 self.replica)
                        self._in_place_logged = True
                else:
                    # One copy of the payload, into a (reused, on the CPU) buffer right behind the block.
                    message = self._buffers.take(total)
                    parts = (payload.indices, payload.lse, payload.values)
                    torch.cat([_flat_bytes(t, self.device) for t in parts], out=message[block:])
                # From pageable memory an asynchronous copy is staged at once and waits for no queued GPU work.
                message[:block].copy_(torch.frombuffer(head, dtype=torch.uint8), non_blocking=True)
                return message
        head = RB.encode_error(seq, block, error or "the teacher sent no payload")
        message = torch.zeros(total, dtype=torch.uint8, device=self.device)
        message[:block].copy_(torch.frombuffer(head, dtype=torch.uint8))
        return message

    def _mismatch(self, payload: TopKPayload, expected: _Expected) -> Optional[str]:
        """A teacher-side check before sending: the payload fits the request it answers."""
        h = payload.header
        if (h.batch, h.seq_len) != (expected.batch, expected.seq_len):
            return f"teacher bug: payload [{h.batch}, {h.seq_len}] for a [{expected.batch}, {expected.seq_len}] request"
        try:
            P.check_payload_fits(h, (expected.batch, expected.seq_len), self.info)
        except P.ProtocolError as e:
            return f"teacher bug: {e}"
        return None

    def _send_in_order(self, student: int) -> None:
        order, held = self._order[student], self._held[student]
        while order and order[0] in held:
            message = held.pop(order.popleft())
            if student not in self._unreachable:
                self._sends.append(self._sender.submit(message, student, TAG_REPLY))
        self._reap()

    def _reap(self, backlog: int = _SEND_BACKLOG) -> None:
        while self._sends and (len(self._sends) > backlog or self._sends[0].done()):
            reply = self._sends.popleft()
            if not reply.wait(60.0) or reply.error is not None:
                # One lost student must not stop the others.
                log.warning("reply to student %d failed (%s); no more replies to it", reply.peer,
                            reply.error or "not taken in 60 s")
                self._unreachable.add(reply.peer)

    def wait_sent(self, timeout_s: float = 60.0) -> None:
        """Until every reply handed over so far is out (posted; a gloo one also completed)."""
        deadline = time.monotonic() + timeout_s
        while self._sends and time.monotonic() < deadline:
            self._sends[-1].posted.wait(max(deadline - time.monotonic(), 0.0))
            self._reap()
            if self._sends and not self._sends[-1].done():
                time.sleep(0.0005)

    def flush(self) -> None:
        self._reap()

    def connected(self) -> dict:
        """Student rank -> student rank, of the students whose requests are still taken in and answered (one that
        said goodbye stays until its queued requests are answered: it may say it before its last replies)."""
        gone = self._dropped | self._unreachable
        return {s: s for s in self.students if s not in gone}

    def finished(self) -> bool:
        if self._beat.lost is not None:
            log.info("the KD store is gone (%s): the students have left", self._beat.lost)
            return True
        # Requests taken in are answered first (a student may say goodbye before its last replies are out);
        # replies still in flight are waited for (bounded) by close().
        gone = self._receiving is not None or set(self.students) <= (self._bye | self._dropped | self._unreachable)
        return gone and not self._expected

    def close(self) -> None:
        self._beat.close()
        deadline = time.monotonic() + 30.0
        while self._sends and time.monotonic() < deadline:
            self._reap() if self._sends[0].done() else time.sleep(0.001)
        if self._sends and self.backend == "nccl":
            _abort(self.pg)  # replies nobody takes in any more: let the process end
        self._sender.close()
        # A thread that still holds a finished gloo work when the interpreter shuts down aborts the process
        # (freeing the work's tensor needs the GIL, which a finalizing interpreter no longer hands out).
        self._receiver.join(timeout=5.0)


def _flat_bytes(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Each torch call is microseconds of host time on the per-message path: none for a tensor already in place.
    if t.device != device or not t.is_contiguous():
        t = t.to(device).contiguous()
    return t.view(-1).view(torch.uint8)
