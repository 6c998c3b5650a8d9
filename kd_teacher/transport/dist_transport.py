"""torch.distributed transport: student ranks and teacher ranks of separate launches, a pair of KD process groups
per student process.

The KD store is a TCPStore at the KD rendezvous address, hosted by the teacher (the head of replica 0; the other
heads connect to it), so that no student's death or restart takes it with it. Student i talks only to the head
of teacher data-parallel replica i % R (its tensor- and pipeline-parallel rank 0); students never talk to each
other, and teacher ranks other than the heads are not in the groups (their head hands them the work over the
teacher's own model-parallel group). Each process already has a default world (its own torchrun job), so the
groups are built directly on the store, outside it.

Joining (`DistClient._handshake`, `DistServer._admit_loop`): a student reads the server's info, takes the next
generation of its rank (a store counter: a restarted process of the same rank gets a new one), writes its hello
(its contract; `num_students`, advisory) under that generation and appends (rank, generation) to a join log
whose counter the heads poll (one store operation every 20 ms). Its head writes a verdict (ok, or the reason it
is refused), and both ends then form the student's own pair of groups, two members each (student PAIR_STUDENT,
head PAIR_TEACHER), under the store prefix `kd/s<rank>/g<generation>/`. A newer generation of a rank replaces
the older one's pair: its unanswered requests are dropped (and logged). Students join and restart at any time.

  store     handshake (server info, generations, hellos, join log, verdicts), one heartbeat counter per replica;
            nothing per message
  requests  gloo, student -> teacher: one message per request, a fixed-size header and the body (token ids,
            sample ids, request id) (`dist_wire`), into receives the teacher keeps posted for that student.
            Gloo on the GPU too: a request is host data, and on its own group it cannot queue in front of
            replies (NCCL orders a pair's sends and receives on one stream per group, so a teacher's receive
            posted for a student's next request would hold back the replies to that student)
  data      NCCL on GPU (payloads stay on the GPU), gloo on CPU, teacher -> student: one reply per request,
            of a size both ends know from the request's shape and the handshake (`dist_wire.reply_layout`)

One student's failure is its own: its pair's connections are its own (with one group of all students, one
member's death reached the others' gloo transfers), the teacher takes each student's requests in on a thread
of that student's and sends its replies from another (a frozen student's full socket blocks only its own
replies), and a failed or timed-out (`student_timeout_s`) send marks only that student gone.
Not done: the NCCL data path is written as the gloo one but was not run here (no GPU); each pair's NCCL
communicator costs device memory, not measured for many students; a frozen student's threads on the teacher
stay blocked until it ends (gloo cannot abort a posted operation).

Per message, a student posts the receive of the reply when it sends the request (at most `max_outstanding`
posted; the request goes out from a sending thread), so transfers run back to back as the teacher sends; the
reply's first block (`reply_block`, fixed binary) says whether it is a payload or an error, and for which
request. The teacher answers each student's requests in the order they arrived, always with exactly one
reply, so a student's receives stay in step.
The teacher (`dist_server.DistServer`) takes each student's requests in on a thread of that student's; the
serving thread builds the replies and the student's sending thread posts them, in order. (Token hashes are the teacher's
work, not the transport's: the engine computes them with the forward.) This module has the student's end
(`DistClient`) and what both ends share.

Per-message cost (what throughput is made of; measured with benchmarks/stream.py's cost breakdown and perf):
  - a request is one gloo message into one of several receives the teacher keeps posted: with a header and a
    body, the body waited in the socket until the teacher's thread got the GIL to post its receive, and
    gloo's event loop spun on the unread socket meanwhile (~0.7 ms of CPU a request on 2 cores);
  - the reply block is binary (no JSON PayloadHeader to write, parse and re-check); the student rebuilds
    the PayloadHeader from its request and the handshake, and compares the token hashes it computed at
    submit with the block's;
  - on the CPU, reply and receive buffers are reused (`buffers.HostBuffers`, each lent until the last tensor
    viewing it is gone): a fresh 2 MB buffer a message cost
    page faults on both sides; the teacher copies the payload once, straight behind the block (or not at all,
    when its engine wrote the payload there: `DistServer.payload_views`);
  - waiting blocks: a gloo op's waiter thread releases a lock that the student blocks on (between heartbeat
    checks), instead of the student's thread spinning on a flag and taking a core from the transfer;
  - no CPU torch op over more than 32k elements on the per-message path (requests are built and read with
    numpy): such an op runs on the intra-op thread pool, and waking it stalled 5-8 ms a request in a process
    with many threads (2 x H100 host, 32 cores);
  - token hashes are computed off the caller's thread (RemoteTeacher), and replies are posted from a sending
    thread (`_Sender`, as requests are: a gloo send writes the whole message inside `send`).
What is left is the per-message floor of Python over torch.distributed: `benchmarks/stream.py` times the
least a student does per message (post the receive, copy the block to the host, decode it, view the payload),
each step alone in a tight loop: 80-113 us on the H100 host, more than the 47-61 us NVLink transfer of a 3 MB
payload; in the running transport, with its threads, each step costs 3-5x that.

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

from kd_teacher.contract import TeacherContract
from kd_teacher.transport import dist_wire as W
from kd_teacher.transport import protocol as P
from kd_teacher.transport import reply_block as RB
from kd_teacher.transport.buffers import HostBuffers

log = logging.getLogger(__name__)

TAG_REQUEST, TAG_REPLY = 1, 3
_UNLIMITED_S = 30 * 86400.0  # gloo waits must not time out by themselves: a timed-out gloo wait closes the pair
_UNLIMITED = datetime.timedelta(seconds=_UNLIMITED_S)
_HEARTBEAT_CHECK_S = 0.02  # a waiting student's receive wakes this often (a local wait, no store traffic)


def heartbeat_read_interval(heartbeat_timeout_s: float) -> float:
    """How often a waiting student reads the teacher's heartbeat from the KD store: a tenth of the timeout,
    between 20 ms and 1 s. The store lives on the teacher (replica 0's head) and serves every student, so a fixed 20 ms cost
    it 50 operations a second per waiting student (3,200/s for 64 students); a tenth of the timeout still
    declares a dead teacher within 1.1 x heartbeat_timeout_s."""
    return min(1.0, max(0.02, heartbeat_timeout_s / 10.0))
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


PAIR_STUDENT, PAIR_TEACHER = 0, 1  # ranks in a (student, replica head) pair's groups


def pair_prefix(student: int, generation: int) -> str:
    """The store prefix of one student process's groups: a restarted student (a new generation) gets new ones."""
    return f"kd/s{student}/g{generation}/"


def pair_groups(store, student: int, generation: int, rank: int, backend: str, timeout_s: float):
    """(requests group, data group) of student `student`'s process `generation` and the head of its replica:
    two members each (PAIR_STUDENT, PAIR_TEACHER), outside the default world. Both ends call this after the
    teacher accepted the student's hello. One pair per student, not a group of all students: a member that dies
    takes only its own pair's connections with it."""
    prefix = pair_prefix(student, generation)
    requests = dist.ProcessGroupGloo(dist.PrefixStore(prefix + "req", store), rank, 2, _td(timeout_s))
    data_store = dist.PrefixStore(prefix + "pg", store)
    if backend == "gloo":
        return requests, dist.ProcessGroupGloo(data_store, rank, 2, _td(timeout_s))
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        # Our own polling bounds every wait; NCCL's watchdog would otherwise take the process down when a
        # receive stays posted longer than this (a slow teacher's late reply).
        opts._timeout = _td(max(timeout_s, 86400.0))
        return requests, dist.ProcessGroupNCCL(data_store, rank, 2, opts)
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
    """A posted send/recv and the tensors it uses (alive until it completed). A gloo op is finished by a waiter
    thread, which releases `finished` (so that waiting for it blocks instead of spinning); an NCCL op is polled."""

    __slots__ = ("work", "keep", "finished", "complete", "error")

    def __init__(self, work, keep):
        self.work, self.keep, self.finished, self.complete, self.error = work, keep, None, False, None

    def done(self) -> bool:
        return self.complete or (self.finished is None and self.work.is_completed())

    def wait(self, timeout_s: float) -> bool:
        """Done within timeout_s? (Never an error: see `error`.)"""
        if self.finished is None:
            return _poll(self.done, time.monotonic() + timeout_s)
        if self.finished.acquire(timeout=max(timeout_s, 0.0)):
            self.finished.release()
        return self.complete


class _JobThread:
    """One daemon thread that handles the jobs put to it, in order (`None` stops it). The handler gets the
    job and then drops it, so the thread holds no finished work while it waits for the next."""

    def __init__(self, name: str):
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _handle(self, job) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self._handle(job)
            job = None

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5.0)


class _GlooWaiter(_JobThread):
    """Waits for gloo operations in the order given, on its own thread, and flags each one when done.
    Gloo's works report completion only to `wait()`, and a timed-out wait closes the connection."""

    def track(self, op: _Op) -> _Op:
        op.finished = threading.Lock()
        op.finished.acquire()  # released by the waiter thread
        self.queue.put(op)
        return op

    def _handle(self, op: _Op) -> None:
        try:
            op.work.wait(_UNLIMITED)
        except Exception as e:  # noqa: BLE001 - handed to whoever polls this op
            op.error = e
        op.complete = True
        op.finished.release()


class _SendJob:
    """One message handed to a `_Sender`: posted (`op`) or failed (`error`) once `posted` is set."""

    __slots__ = ("message", "peer", "tag", "stream", "op", "error", "posted")

    def __init__(self, message: torch.Tensor, peer: int, tag: int):
        self.message, self.peer, self.tag, self.op, self.error = message, peer, tag, None, None
        # The stream the caller wrote the message on: the send is ordered after it (a NCCL send waits for the
        # current stream of the thread that posts it).
        self.stream = torch.cuda.current_stream(message.device) if message.is_cuda else None
        self.posted = threading.Event()

    def done(self) -> bool:
        return self.posted.is_set() and (self.op is None or self.op.done())

    def wait(self, timeout_s: float) -> bool:
        """Out (posted, and complete where the sender waits for its sends) within timeout_s? See `error`."""
        deadline = time.monotonic() + timeout_s
        if not self.posted.wait(timeout_s):
            return False
        return self.op is None or self.op.wait(deadline - time.monotonic())


class _Sender(_JobThread):
    """Posts messages in the order handed over, from a thread of its own. A gloo send writes the message into
    the socket inside `send` (tens of microseconds for a request, ~400 us for a 2 MB reply, as long as the
    transfer itself) that the caller's thread need not spend. With `wait_sends` (gloo) it also waits there for
    each send to complete; otherwise (NCCL) the send is polled (`_Op.done`)."""

    def __init__(self, pg, wait_sends: bool, name: str):
        self.pg, self.wait_sends = pg, wait_sends
        super().__init__(name)

    def submit(self, message: torch.Tensor, peer: int, tag: int) -> _SendJob:
        job = _SendJob(message, peer, tag)
        self.queue.put(job)
        return job

    def _handle(self, job: _SendJob) -> None:
        try:
            if job.stream is not None:
                with torch.cuda.stream(job.stream):
                    op = _Op(self.pg.send([job.message], job.peer, job.tag), job.message)
            else:
                op = _Op(self.pg.send([job.message], job.peer, job.tag), job.message)
            if self.wait_sends:
                op.work.wait(_UNLIMITED)  # a written socket: at once, unless the peer stopped reading
                op.complete = True
            job.op = op
        except Exception as e:  # noqa: BLE001 - handed to whoever waits for this job
            job.error = e
        job.posted.set()


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
