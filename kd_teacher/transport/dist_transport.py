"""torch.distributed transport: student ranks and teacher ranks of separate launches, one KD process group.

Rank layout of the KD group (size S + R): student rank i is KD rank i (i = its rank in the student's own
training world, 0..S-1); the head of teacher data-parallel replica r (its tensor- and pipeline-parallel rank
0) is KD rank S + r. Student i talks only to replica i % R; students never talk to each other, and teacher
ranks other than the heads are not in the group (their head hands them the work over the teacher's own
model-parallel group).

Each process already has a default world (its own torchrun job), so the KD group is built directly on a
TCPStore at the KD rendezvous address, hosted by student rank 0 (`ProcessGroupGloo` / `ProcessGroupNCCL` over
a PrefixStore), and used only through its own send/recv.

Two planes:
  control  the TCPStore: handshake keys, one request queue per replica (`kd/req/<r>`, token ids inline: 8
           bytes a token), one reply-header queue per student (`kd/rep/<i>`), a heartbeat counter per replica
  data     the payload (indices, lse, values packed into one buffer, one transfer) by point-to-point send/recv
           of the KD group: on the GPU with NCCL, on the CPU with gloo; the same code

Bounded waits: a student never posts a recv before the reply header says the data is on its way, so it only
ever waits on the store (non-blocking pops), checking the teacher's heartbeat while it polls: a dead or frozen teacher
stops its heartbeat and the wait fails with TeacherUnavailableError after `heartbeat_timeout_s`; a slow one
with TeacherTimeoutError at the request's timeout. The recv itself is bounded too (gloo: the work's timeout;
NCCL: polling, then abort). The store lives in the student job, so a hung teacher cannot hang a store call.
A failure of the data plane leaves the channel unusable (a recv cannot be withdrawn): the student gets
TeacherUnavailableError for this and every later request. A restarted torch.distributed teacher needs the
students to reconnect; the shared-memory transport is the one that reattaches by itself.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from kd_teacher.payload import TopKPayload
from kd_teacher.transport import protocol as P

log = logging.getLogger(__name__)

_STORE_MESSAGE_MAX = P.MAX_HEADER_BYTES + 8 * (1 << 24)  # a request: header + up to 16M token ids


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


def kd_group(store, rank: int, size: int, backend: str, timeout_s: float):
    """The KD process group, outside the default world: all S + R members call this at connect."""
    prefix = dist.PrefixStore("kd/pg", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefix, rank, size, _td(timeout_s))
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _td(timeout_s)
        return dist.ProcessGroupNCCL(prefix, rank, size, opts)
    raise ValueError(f"KD backend {backend!r} is not gloo or nccl")


def _wait(work, timeout_s: float, backend: str, pg) -> None:
    """Wait for a send/recv, bounded: gloo honours the work's timeout, NCCL is polled and aborted."""
    if backend == "gloo":
        work.wait(_td(timeout_s))
        return
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if time.monotonic() > deadline:
            abort = getattr(pg, "abort", None)
            if abort is not None:
                abort()
            raise TimeoutError(f"NCCL transfer did not complete in {timeout_s:.1f} s")
        time.sleep(0.0002)


def _pop(store, key: str, deadline: float, between=None, max_pause: float = 0.001) -> Optional[bytes]:
    """The next message of queue `key`, or None at the deadline. Non-blocking pops with a growing pause:
    a blocking pop that times out must cancel its wait on the server, which hangs if the server is frozen
    (and c10d logs every timed-out wait)."""
    pause = 0.00005
    while True:
        try:
            return store.queue_pop(key, block=False)
        except dist.QueueEmptyError:
            pass
        if between is not None:
            between()
        if time.monotonic() >= deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 2, max_pause)


class _Heartbeat:
    """Bumps the replica's heartbeat counter from its own thread and store connection."""

    def __init__(self, address: str, key: str, interval_s: float, timeout_s: float):
        self.store = _store(address, False, timeout_s)
        self.key, self.interval_s = key, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.store.add(self.key, 1)
            except Exception:  # noqa: BLE001 - the students' store is gone; the serve loop notices too
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)


# ---- teacher side -----------------------------------------------------------------------------------------------
class DistServer:
    """The head of teacher replica `replica`: joins the KD group as rank S + replica and serves its students."""

    def __init__(self, address: str, info: P.ServerInfo, replica: int = 0, *, backend: Optional[str] = None,
                 connect_timeout_s: float = 600.0, heartbeat_interval_s: float = 0.1, device=None):
        self.address, self.info, self.replica = address, info, replica
        self.backend = backend or default_backend()
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu"))
        self.store = _store(address, False, connect_timeout_s)
        if replica == 0:
            self.store.set("kd/server", info.to_json())
        self.num_students = self._admit_students(connect_timeout_s)
        R = info.replicas
        self.students = [i for i in range(self.num_students) if i % R == replica]
        self.pg = kd_group(self.store, self.num_students + replica, self.num_students + R, self.backend,
                           connect_timeout_s)
        self._queue = f"kd/req/{replica}"
        self._sends: list = []  # (work, tensor, student): tensors stay alive until their send completed
        self._dead: set[int] = set()
        self._bye: set[int] = set()
        self._gone = False
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
            problems = P.incompatibilities(self.info, P.Expectation(**hello["expect"]))
            if int(hello["num_students"]) != S:
                problems.append(f"num_students {hello['num_students']} != {S} (student 0's)")
            if self.replica == 0:
                self.store.set(f"kd/verdict/{i}", json.dumps({"ok": not problems, "reason": "; ".join(problems)}))
            if problems:
                refused.append(f"student {i}: " + "; ".join(problems))
        if refused:
            raise P.IncompatibleTeacherError("refused at connect, the KD group is not formed: " + " | ".join(refused))
        return S

    def poll(self, timeout: float, max_requests: int = 64) -> list:
        """Requests and (student, seq, error) pairs that arrived within `timeout` (blocking on the first)."""
        raw = []
        try:
            first = _pop(self.store, self._queue, time.monotonic() + timeout)
            if first is not None:
                raw.append(first)
                while len(raw) < max_requests and self.store.queue_len(self._queue) > 0:
                    raw.append(self.store.queue_pop(self._queue, block=False))
        except Exception as e:  # noqa: BLE001
            log.info("the KD store is gone (%s): the students have left", e)
            self._gone = True
        out = []
        for msg in raw:
            item = self._parse(msg)
            if item is not None:
                out.append(item)
        return out

    def _parse(self, msg: bytes):
        try:
            header, buffers = P.decode(msg, _STORE_MESSAGE_MAX)
            student, seq = P.request_header_ok(header)
        except P.ProtocolError as e:
            log.warning("dropping a malformed request: %s", e)
            return None
        if student not in self.students:
            log.warning("dropping a request from student %d, which replica %d does not serve", student, self.replica)
            return None
        if header.get("type") == "bye":
            self._bye.add(student)
            return None
        try:
            return P.decode_request(header, buffers, self.info)
        except P.RequestRejectedError as e:
            return (student, seq, str(e))

    def reply(self, student: int, seq: int, payload: Optional[TopKPayload] = None, error: Optional[str] = None):
        if student in self._dead or self._gone:
            return
        try:
            self.store.queue_push(f"kd/rep/{student}", P.encode(P.reply_header(seq, payload, error)))
            if payload is None:
                return
            packed = P.pack_payload(payload, self.device)
            self._sends.append((self.pg.send([packed], student, 0), packed, student))
            self._reap(max_pending=48)
        except Exception as e:  # noqa: BLE001 - one lost student must not stop the others
            log.warning("student %d is unreachable, no more replies to it: %s", student, e)
            self._dead.add(student)

    def _reap(self, max_pending: int) -> None:
        while len(self._sends) > max_pending or (self._sends and self._sends[0][0].is_completed()):
            work, _, student = self._sends.pop(0)
            try:
                _wait(work, 60.0, self.backend, self.pg)
            except Exception as e:  # noqa: BLE001
                log.warning("send to student %d failed: %s", student, e)
                self._dead.add(student)

    def flush(self) -> None:
        self._reap(max_pending=48)

    def finished(self) -> bool:
        return self._gone or set(self.students) <= (self._bye | self._dead)

    def close(self) -> None:
        self._beat.close()
        self._reap(max_pending=0)


# ---- student side -----------------------------------------------------------------------------------------------
class DistClient:
    """A student rank's end: hosts the KD store on rank 0, handshakes, joins the KD group, moves messages."""

    def __init__(self, address: str, student: int, num_students: int, expect: P.Expectation, *,
                 backend: Optional[str] = None, connect_timeout_s: float = 600.0, heartbeat_timeout_s: float = 30.0,
                 device=None):
        self.student, self.num_students = student, num_students
        self.backend = backend or default_backend()
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu"))
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.broken: Optional[str] = None
        deadline = time.monotonic() + connect_timeout_s
        self.store = _store(address, student == 0, connect_timeout_s)
        self.store.set_timeout(_td(connect_timeout_s))
        try:
            self.store.wait(["kd/server"])
        except Exception as e:  # noqa: BLE001
            raise P.TeacherUnavailableError(f"no teacher announced itself at {address} in {connect_timeout_s} s") from e
        self.info = P.ServerInfo.from_json(self.store.get("kd/server"))
        problems = P.incompatibilities(self.info, expect)
        hello = {"num_students": num_students, "expect": json.loads(expect.to_json())}
        self.store.set(f"kd/hello/{student}", json.dumps(hello))
        if problems:
            raise P.IncompatibleTeacherError(f"teacher at {address} refused: " + "; ".join(problems))
        self.store.wait([f"kd/verdict/{student}"])
        verdict = json.loads(self.store.get(f"kd/verdict/{student}"))
        if not verdict["ok"]:
            raise P.IncompatibleTeacherError(f"teacher at {address} refused this student: {verdict['reason']}")
        self.replica = student % self.info.replicas
        self.teacher_rank = num_students + self.replica
        self.pg = kd_group(self.store, student, num_students + self.info.replicas, self.backend,
                           max(deadline - time.monotonic(), 1.0))
        self._requests_q, self._replies_q = f"kd/req/{self.replica}", f"kd/rep/{student}"
        self._hb_key = f"kd/hb/{self.replica}"
        self._beat = (self.store.add(self._hb_key, 0), time.monotonic())
        self._checked = 0.0

    def _fail(self, message: str, cls=P.TeacherUnavailableError):
        self.broken = message
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

    def send(self, seq: int, tokens: torch.Tensor, sample_ids, request_id, deadline: float) -> None:
        if self.broken:
            raise P.TeacherUnavailableError(f"the KD channel is unusable: {self.broken}")
        msg = P.encode_request(self.student, seq, tokens, sample_ids, request_id)
        try:
            self.store.queue_push(self._requests_q, msg)
        except Exception as e:  # noqa: BLE001
            self._fail(f"the KD store is unreachable: {e}")

    def receive(self, deadline: float, shape_of: Callable[[int], Optional[tuple]]):
        if self.broken:
            raise P.TeacherUnavailableError(f"the KD channel is unusable: {self.broken}")
        try:
            msg = _pop(self.store, self._replies_q, deadline, between=self._check_teacher, max_pause=0.00025)
        except P.TransportError:
            raise
        except Exception as e:  # noqa: BLE001
            self._fail(f"the KD store is unreachable: {e}")
        if msg is None:
            return None
        header, _ = P.decode(msg, P.MAX_HEADER_BYTES + 64)
        seq = P.reply_seq(header)
        if header.get("status") != "ok":
            return seq, None, str(header.get("error"))
        shape = shape_of(seq)
        try:
            ph = P.check_payload_header(header, shape if shape is not None else _claimed_shape(header, self.info),
                                        self.info)
        except P.ProtocolError as e:
            self._fail(f"bad reply header, the channel is out of step: {e}", P.ProtocolError)
        buf = torch.empty(sum(ph.buffer_sizes()), dtype=torch.uint8, device=self.device)
        grace = max(deadline - time.monotonic(), 0.0) + 0.05 * self.heartbeat_timeout_s + 0.05
        try:
            _wait(self.pg.recv([buf], self.teacher_rank, 0), grace, self.backend, self.pg)
        except Exception as e:  # noqa: BLE001
            self._fail(f"receiving the payload of request {seq} from teacher replica {self.replica} failed: {e}")
        return seq, P.unpack_payload(buf, ph), None

    def close(self) -> None:
        if not self.broken:
            try:
                self.store.queue_push(self._requests_q, P.encode({"type": "bye", "student": self.student,
                                                                  "seq": -1}))
            except Exception:  # noqa: BLE001
                pass
        self.broken = self.broken or "closed"


def _claimed_shape(header: dict, info: P.ServerInfo) -> tuple:
    """A stale reply's own shape, bounded by the handshake, so that its data can be drained."""
    ph = header.get("payload") or {}
    b, s = ph.get("batch"), ph.get("seq_len")
    if not isinstance(b, int) or not isinstance(s, int) or b * s > info.max_tokens_per_request:
        raise P.ProtocolError(f"stale reply claims an absurd shape [{b}, {s}]")
    return b, s
