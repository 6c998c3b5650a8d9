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
work, not the transport's: the engine computes them with the forward.) This module has what both ends share;
the student's end is `dist_client.DistClient`.

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
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TAG_REQUEST, TAG_REPLY = 1, 3
_UNLIMITED_S = 30 * 86400.0  # gloo waits must not time out by themselves: a timed-out gloo wait closes the pair
_UNLIMITED = datetime.timedelta(seconds=_UNLIMITED_S)
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
