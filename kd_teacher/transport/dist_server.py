"""The teacher's end of the torch.distributed transport (`dist_transport` describes the design): the head of
one teacher data-parallel replica hosts (replica 0) or joins the KD store, admits students as their hellos
appear (one pair of groups per student process), takes each student's requests in on a thread of that student's
own, and answers each student's requests in the order they came, always with exactly one reply of the size the
student expects, from a sending thread of that student's own.
"""

from __future__ import annotations

import collections
import itertools
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
    _UNLIMITED,
    PAIR_STUDENT,
    PAIR_TEACHER,
    TAG_REPLY,
    TAG_REQUEST,
    _abort,
    _device_for,
    _Heartbeat,
    _Sender,
    _store,
    default_backend,
    pair_groups,
)

log = logging.getLogger(__name__)

_REQUESTS_POSTED = 4  # request receives the teacher keeps posted per student
_JOIN_POLL_S = 0.02  # how often a head reads the store's join counter (one store operation)


@dataclass
class _Expected:
    """What the reply to one received request must look like."""

    batch: int
    seq_len: int


class _Pair:
    """One student process (rank, generation) and this head: their two groups, the thread that takes its
    requests in, the thread that sends its replies, and its requests waiting for replies. Only the serving
    thread changes it, except `_expect` (its receiving thread, before the request is handed on) and `failed`."""

    def __init__(self, key: int, rank: int, generation: int, requests_pg, pg, sender: _Sender):
        self.key, self.rank, self.generation = key, rank, generation
        self.requests_pg, self.pg, self.sender = requests_pg, pg, sender
        self.order: collections.deque = collections.deque()  # seqs in arrival order, not yet answered
        self.expected: dict = {}  # seq -> _Expected
        self.held: dict = {}  # replies ready before an earlier one
        self.staged: dict = {}  # seq -> reply buffer whose payload views `payload_views` handed out
        self.sends: collections.deque = collections.deque()  # (monotonic time handed over, _SendJob), in order
        self.waiting: collections.deque = collections.deque()  # taken in, not yet handed to poll's caller
        self.bye = False
        self.failed: Optional[str] = None  # set by any thread: the pair is dropped by the serving thread
        self.receiver: Optional[threading.Thread] = None

    def __repr__(self) -> str:
        return f"student {self.rank} (generation {self.generation})"


class DistServer:
    """The head of teacher replica `replica`: admits the students i with i % replicas == replica whenever they
    say hello, and serves them; replica 0 hosts the KD store at `address`."""

    def __init__(self, address: str, info: P.ServerInfo, replica: int = 0, *, backend: Optional[str] = None,
                 connect_timeout_s: float = 600.0, heartbeat_interval_s: float = 0.1, device=None,
                 student_timeout_s: float = 60.0):
        self.address, self.info, self.replica = address, info, replica
        self.backend = backend or default_backend()
        self.device = _device_for(self.backend, device)
        self.connect_timeout_s, self.student_timeout_s = connect_timeout_s, student_timeout_s
        # Hosted here, not by a student: no student's death (or restart) takes the store with it.
        self.store = _store(address, replica == 0, connect_timeout_s)
        if replica == 0:
            self.store.set("kd/server", info.to_json())
        self._buffers = HostBuffers(self.device)
        self._inbox: "queue.SimpleQueue" = queue.SimpleQueue()  # requests of every pair; None: look around
        self._joined: "queue.SimpleQueue" = queue.SimpleQueue()  # pairs formed, to be installed by poll
        self._pairs: dict = {}  # key -> _Pair, the installed ones not yet dropped
        self._current: dict = {}  # student rank -> its newest installed generation
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._forming = 0  # pairs being formed (under _lock)
        # Ranks this replica expects (from the students' advisory num_students, and every rank that said hello),
        # and how each one's newest process left: rank -> (said goodbye, monotonic time). The server ends once
        # every expected rank left for good (`finished`).
        self._ranks: set = set()
        self._left: dict = {}
        self._said_done = False
        self._hello_seen = False  # any student's, of any replica: until then the server waits for students
        self._in_place_logged = False
        self.dropped_requests = 0  # requests of students that left or were replaced, not answered
        self._closing = threading.Event()
        self._beat = _Heartbeat(address, f"kd/hb/{replica}", heartbeat_interval_s, connect_timeout_s)
        self._admitter = threading.Thread(target=self._admit_loop, name="kd-admit", daemon=True)
        self._admitter.start()
        log.info("KD replica %d up at %s (%s): students i with i %% %d == %d join whenever they say hello",
                 replica, address, self.backend, info.replicas, replica)

    # ---- admitting students (own thread; one more per pair being formed) ---------------------------------------
    def _admit_loop(self) -> None:
        """Reads the store's join log (`DistClient._handshake`): one store operation per round while nobody joins."""
        seen = 0
        try:
            store = _store(self.address, False, self.connect_timeout_s)
            while not self._closing.wait(_JOIN_POLL_S):
                joins = int(store.add("kd/joins", 0))
                while seen < joins:
                    key = f"kd/join/{seen + 1}"
                    if not store.check([key]):
                        break  # counted, not written yet: read it on the next round
                    entry = store.get(key).decode()
                    seen += 1
                    try:
                        rank, generation = (int(x) for x in entry.split("/"))
                    except ValueError:
                        log.warning("KD replica %d: join log entry %r is not rank/generation; ignored", self.replica,
                                    entry)
                        continue
                    if rank % self.info.replicas == self.replica:
                        self._judge(store, rank, generation)
                    else:  # another replica's student: its num_students may name ranks this replica serves
                        self._note_expected(store, rank, generation)
        except Exception as e:  # noqa: BLE001 - the store is gone (replica 0 ended): nobody can join
            if not self._closing.is_set():
                log.warning("KD replica %d stops admitting students: %s", self.replica, e)

    def _judge(self, store, rank: int, generation: int) -> None:
        try:
            hello = json.loads(store.get(f"kd/hello/{rank}/{generation}"))
            problems = P.incompatibilities(self.info, P.student_expectation(hello))
        except (ValueError, KeyError, TypeError, AttributeError, P.ProtocolError) as e:  # refuses that student only
            hello, problems = {}, [f"unreadable hello: {type(e).__name__}: {e}"]
        if not problems:
            self._expect(rank, hello.get("num_students"), own=True)
        store.set(f"kd/verdict/{rank}/{generation}", json.dumps({"ok": not problems, "reason": "; ".join(problems)}))
        if problems:
            log.warning("refused student %d (generation %d): %s", rank, generation, "; ".join(problems))
            return
        with self._lock:
            self._forming += 1
        # A thread per pair: forming waits for the student's side, and a student that died after its hello
        # must not hold up the next one.
        threading.Thread(target=self._form, args=(rank, generation, hello.get("num_students")),
                         name=f"kd-form-{rank}", daemon=True).start()

    def _note_expected(self, store, rank: int, generation: int) -> None:
        try:
            hello = json.loads(store.get(f"kd/hello/{rank}/{generation}"))
            self._expect(rank, hello.get("num_students"), own=False)
        except (ValueError, AttributeError) as e:  # that student's replica refuses it
            log.debug("hello of student %d (generation %d) unreadable: %s", rank, generation, e)

    def _expect(self, rank: int, num_students, own: bool) -> None:
        R = self.info.replicas
        ranks = [i for i in range(num_students) if i % R == self.replica] if isinstance(num_students, int) else []
        with self._lock:
            self._ranks.update(ranks + ([rank] if own else []))
            self._hello_seen = True

    def _form(self, rank: int, generation: int, num_students) -> None:
        try:
            store = _store(self.address, False, self.connect_timeout_s)
            requests_pg, pg = pair_groups(store, rank, generation, PAIR_TEACHER, self.backend, self.connect_timeout_s)
            # gloo sends are waited for on the sending thread; NCCL ones are polled (`_Op.done`).
            sender = _Sender(pg, wait_sends=self.backend == "gloo", name=f"kd-reply-sender-{rank}")
            # One small message first, so that NCCL sets up the pair's communicator now and not inside the first
            # request.
            ping = sender.submit(torch.ones(4, dtype=torch.uint8, device=self.device), PAIR_STUDENT, TAG_REPLY)
            if not ping.wait(self.connect_timeout_s) or ping.error is not None:
                sender.queue.put(None)
                raise P.TeacherUnavailableError(f"no KD warm-up: {ping.error or 'timed out'}")
            self._joined.put(_Pair(next(self._keys), rank, generation, requests_pg, pg, sender))
            log.info("KD replica %d: student %d joined (generation %d; the student says %s students in all)",
                     self.replica, rank, generation, num_students)
        except Exception as e:  # noqa: BLE001 - this student is not served; the others go on
            log.warning("KD replica %d: the groups of student %d (generation %d) did not form: %s", self.replica,
                        rank, generation, e)
        finally:
            with self._lock:
                self._forming -= 1
            self._inbox.put(None)  # wakes the serving thread

    def _install(self) -> None:
        """On the serving thread: the pairs formed since the last poll start serving; an older generation of the
        same student is dropped (its process is gone or replaced)."""
        while True:
            try:
                pair = self._joined.get_nowait()
            except queue.Empty:
                return
            old = self._pairs.get(self._current.get(pair.rank))
            if old is not None and old.generation > pair.generation:
                self._drop(pair, f"a newer generation ({old.generation}) is already served")
                continue
            if old is not None:
                self._drop(old, f"restarted: generation {pair.generation} took its place")
            self._pairs[pair.key] = pair
            self._current[pair.rank] = pair.key
            self._left.pop(pair.rank, None)
            pair.receiver = threading.Thread(target=self._receive_requests, args=(pair,),
                                             name=f"kd-requests-{pair.rank}", daemon=True)
            pair.receiver.start()

    def _drop(self, pair: _Pair, why: str) -> None:
        """The student is gone (or replaced): its queued requests are dropped (and logged), nothing more is
        sent to it; the others are not touched."""
        self._pairs.pop(pair.key, None)
        if self._current.get(pair.rank) == pair.key:
            del self._current[pair.rank]
        unanswered = len(pair.expected)
        self.dropped_requests += unanswered
        level = logging.INFO if (pair.bye and not unanswered) else logging.WARNING
        log.log(level, "KD replica %d: %r dropped (%s); %d of its requests unanswered", self.replica, pair, why,
                unanswered)
        pair.failed = pair.failed or why
        if self._current.get(pair.rank) is None and pair.rank not in self._left:
            self._left[pair.rank] = (pair.bye, time.monotonic())
        for kept in (pair.expected, pair.held, pair.staged, pair.order, pair.waiting):
            kept.clear()
        if self.backend == "nccl" and any(not job.done() for _, job in pair.sends):
            _abort(pair.pg)  # sends nobody takes in any more: let the sending thread go on
        pair.sends.clear()
        pair.sender.queue.put(None)  # not joined: it may be inside a send to a frozen student

    # ---- taking requests in (a thread per pair) ---------------------------------------------------------------
    def _receive_requests(self, pair: _Pair) -> None:
        # Several receives stay posted: a request that arrives while this thread waits for the GIL lands in one
        # of them at once (with none posted, gloo's event loop spins on the unread socket until one is).
        capacity = W.request_capacity(self.info)
        ring = [torch.empty(capacity, dtype=torch.uint8) for _ in range(_REQUESTS_POSTED)]
        posted = collections.deque((buf, pair.requests_pg.recv([buf], PAIR_STUDENT, TAG_REQUEST)) for buf in ring)
        try:
            while not pair.bye and pair.failed is None:
                buf, work = posted.popleft()
                work.wait(_UNLIMITED)
                work = None
                item = self._take_request(pair, buf)  # copies out what it keeps
                if pair.bye or pair.failed is not None:
                    break
                posted.append((buf, pair.requests_pg.recv([buf], PAIR_STUDENT, TAG_REQUEST)))
                if item is not None:
                    self._inbox.put(item)
        except Exception as e:  # noqa: BLE001 - this student's side is gone; the others are not touched
            pair.failed = pair.failed or f"its requests' connection failed: {type(e).__name__}: {e}"
        self._inbox.put(None)  # wakes the serving thread

    def _take_request(self, pair: _Pair, message: torch.Tensor):
        """A Request, (student key, seq, error) for one to answer with an error, or None (nothing to answer)."""
        try:
            header = W.parse_request_header(bytes(message[:W.REQUEST_HEADER_BYTES].numpy()))
            if header.student != pair.rank:
                raise P.ProtocolError(f"header of student {header.student} on the groups of student {pair.rank}")
        except P.ProtocolError as e:
            # Without a sequence number we trust, no reply can be matched to it: this student is out of step.
            pair.failed = f"malformed request header: {e}"
            return None
        if header.kind == W.KIND_BYE:
            pair.bye = True
            return None
        # Recorded before the request is handed on: the serving thread may answer it at once.
        pair.expected[header.seq] = _Expected(header.batch, header.seq_len)
        pair.order.append(header.seq)
        refused = W.refusal(header, self.info)
        if refused is not None:  # the claimed body does not even fit the message: an error-only reply
            log.warning("student %d: %s", pair.rank, refused)
            return pair.key, header.seq, refused
        try:
            body = message[W.REQUEST_HEADER_BYTES:W.REQUEST_HEADER_BYTES + header.body_bytes]
            request = W.decode_request_body(header, body, self.info)
        except P.RequestRejectedError as e:
            return pair.key, header.seq, str(e)
        request.student = pair.key  # the serving loop's id of this student process (`connected` names its rank)
        return request

    # ---- the serving thread's interface -----------------------------------------------------------------------
    def poll(self, timeout: float, max_requests: int = 64,
             allowance: Optional[Callable[[int], int]] = None) -> list:
        """Requests and (student, seq, error) triples that arrived within `timeout` (blocking on the first).
        `allowance(student)`: how many more of that student's requests the caller takes now; the rest wait here
        in arrival order. Students that joined since the last call start being served here, and those that
        failed are dropped here."""
        self._install()
        self._look_after()
        try:
            waiting = any(p.waiting for p in self._pairs.values())
            item = self._inbox.get(timeout=timeout) if not waiting else self._inbox.get_nowait()
            while True:
                if item is None:
                    self._install()
                else:
                    pair = self._pairs.get(item.student if isinstance(item, P.Request) else item[0])
                    if pair is not None:  # not a request of a student dropped meanwhile
                        pair.waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        self._look_after()
        out = []
        for key, pair in list(self._pairs.items()):
            room = min(max_requests - len(out), allowance(key) if allowance is not None else len(pair.waiting))
            while pair.waiting and room > 0:
                out.append(pair.waiting.popleft())
                room -= 1
        return out

    def payload_views(self, student: int, seq: int):
        """(values, indices, lse) for the teacher to write its payload for request `seq` of `student` into, or
        None (no such request waiting, or an error-only reply). A payload made of exactly these tensors is sent
        from the buffer behind them with no copy: its reply block is written in front of it. Any other payload
        is copied into a reply buffer as usual."""
        pair = self._pairs.get(student)
        expected = pair.expected.get(seq) if pair is not None else None
        if expected is None:
            return None
        block, total = W.reply_layout(expected.batch, expected.seq_len, self.info)
        if block == total:
            return None
        message = self._buffers.take(total)
        pair.staged[seq] = message
        return P.packed_views(message[block:], expected.batch, expected.seq_len, self.info.k, self.info.values_dtype)

    def reply(self, student: int, seq: int, payload: Optional[TopKPayload] = None, error: Optional[str] = None):
        """Answer request `seq` of `student`; sent once the replies to its earlier requests are out."""
        pair = self._pairs.get(student)
        if pair is None:  # dropped (gone or replaced): its requests were counted and logged then
            return
        expected = pair.expected.pop(seq, None)
        staged = pair.staged.pop(seq, None)
        if expected is None:
            log.warning("no request %d of %r is waiting for a reply; dropped", seq, pair)
            return
        try:
            message = self._message(seq, expected, payload, error, staged)
        except Exception as e:  # noqa: BLE001 - a reply that cannot be built becomes an error reply
            log.exception("reply %d to %r cannot be built", seq, pair)
            message = self._message(seq, expected, None, f"the teacher failed to build the reply: {e}")
        pair.held[seq] = message
        self._send_in_order(pair)

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

    def _send_in_order(self, pair: _Pair) -> None:
        # Each student's replies go out on its own sending thread: a student that stopped reading (its socket
        # full) holds up only its own replies.
        now = time.monotonic()
        while pair.order and pair.order[0] in pair.held:
            message = pair.held.pop(pair.order.popleft())
            pair.sends.append((now, pair.sender.submit(message, PAIR_STUDENT, TAG_REPLY)))
        self._reap(pair)

    def _reap(self, pair: _Pair) -> None:
        """Forget the sends that are out; a failed one, or one not out after student_timeout_s, marks this student
        gone (never waits: the serving thread serves the others meanwhile)."""
        while pair.sends and pair.sends[0][1].done():
            _, job = pair.sends.popleft()
            if job.error is not None:
                pair.failed = pair.failed or f"a reply to it failed: {job.error}"
        if pair.sends and time.monotonic() - pair.sends[0][0] > self.student_timeout_s:
            pair.failed = pair.failed or f"it took no reply in for {self.student_timeout_s:.0f} s"

    def _look_after(self) -> None:
        """Reap every student's sends; drop the students that failed, and those that said goodbye and have all
        their replies out."""
        for pair in list(self._pairs.values()):
            self._reap(pair)
            if pair.failed is not None:
                self._drop(pair, pair.failed)
            elif pair.bye and not pair.expected and not pair.sends and not pair.waiting:
                self._drop(pair, "said goodbye")

    def wait_sent(self, timeout_s: float = 60.0) -> None:
        """Until every reply handed over so far is out (posted; a gloo one also completed), or its student gone."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for pair in list(self._pairs.values()):
                self._reap(pair)
            if not any(pair.sends and pair.failed is None for pair in self._pairs.values()):
                return
            time.sleep(0.0005)

    def data_group(self, student: int):
        """(data group, the student's rank in it) of a connected student (benchmarks/stream.py sends its raw
        baseline there)."""
        return self._pairs[student].pg, PAIR_STUDENT

    def flush(self) -> None:
        self._install()
        self._look_after()

    def connected(self) -> dict:
        """Student id (one per student process) -> student rank, of the students whose requests are taken in and
        answered (one that said goodbye stays until its queued requests are answered: it may say it before its
        last replies)."""
        return {key: pair.rank for key, pair in self._pairs.items() if pair.failed is None}

    def finished(self) -> bool:
        """Once every student this replica expects (the ranks below the students' num_students that it serves,
        and any other rank that joined) has left for good: said goodbye with its requests answered, or died and
        did not come back (a restart, same rank) within student_timeout_s; and no other is joining. Replica 0,
        which hosts the store, also waits for every other replica to be finished."""
        if self._beat.lost is not None:
            log.info("the KD store is gone (%s): the students have left", self._beat.lost)
            return True
        if not self._served_all():
            return False
        if not self._said_done:  # once: a replica's count in the store, for replica 0
            self.store.add("kd/replicas_done", 1)
            self._said_done = True
        return self.replica != 0 or int(self.store.add("kd/replicas_done", 0)) >= self.info.replicas

    def _served_all(self) -> bool:
        self._install()
        self._look_after()
        with self._lock:
            forming, ranks, seen = self._forming, list(self._ranks), self._hello_seen
        if not seen or self._pairs or forming or not self._joined.empty():
            return False
        now = time.monotonic()
        return all(r in self._left and (self._left[r][0] or now - self._left[r][1] >= self.student_timeout_s)
                   for r in ranks)

    def close(self) -> None:
        self._closing.set()
        self._beat.close()
        self.wait_sent(30.0)
        for pair in list(self._pairs.values()):
            if pair.sends and self.backend == "nccl":
                _abort(pair.pg)  # replies nobody takes in any more: let the process end
            pair.sender.queue.put(None)
        self._admitter.join(timeout=1.0)
        # A thread that still holds a finished gloo work when the interpreter shuts down aborts the process
        # (freeing the work's tensor needs the GIL, which a finalizing interpreter no longer hands out). Bounded
        # in all: a thread inside a send to a frozen student would never end.
        end = time.monotonic() + 5.0
        for pair in list(self._pairs.values()):
            for thread in (pair.sender.thread, pair.receiver):
                if thread is not None:
                    thread.join(timeout=max(end - time.monotonic(), 0.0))


def _flat_bytes(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Each torch call is microseconds of host time on the per-message path: none for a tensor already in place.
    if t.device != device or not t.is_contiguous():
        t = t.to(device).contiguous()
    return t.view(-1).view(torch.uint8)
