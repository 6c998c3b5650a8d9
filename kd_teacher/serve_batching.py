"""One queue for the requests of every student a teacher replica serves, taken out in fair rounds.

`kd-teacher serve` keeps one lane per connected student (a shared-memory channel, a torch.distributed student
rank). A round is what one `engine.score_many` call runs: the head takes requests round-robin across the lanes,
one request per student per turn, starting each round at the lane after the one the last round started at,
until the next request would take the round over `max_tokens` tokens (`engine.max_tokens_per_batch`; a round
holds at least one request). The engine's scheduler then packs the round into forwards of at most that many
tokens when the serving policy allows repacking, or runs each request as given (`kd_teacher.precision`).

Fairness, in rounds rather than seconds (so that it holds on any machine, loaded or not): a request that is in
the queue when a round is formed is in that round unless the round is already full with one request from each
of the students before it in this round's order. With S students and a budget of at least S requests' tokens
a request is scored in the first round formed after it arrived, however many requests another student has
queued; a flooding student only ever fills the room the others leave.

Backpressure is per student: a lane takes at most `max_in_flight` requests (queued or being scored) of its
student; the rest wait in that student's transport (its shared-memory ring, its gloo receives), so a student
that sends many requests at once slows down only itself.

The batching window `max_wait_s` bounds the latency batching adds: a round is formed as soon as the queue
holds a full round's tokens, or once the oldest queued request has waited `max_wait_s`, whichever comes first.

A student that leaves (its channel is dropped, its process is gone) loses its queued requests: nobody would
take their replies in. Its lane goes, and a restarted student (same rank) gets a new lane and continues.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

log = logging.getLogger(__name__)

_LATENCIES_KEPT = 100_000  # per student: a long-running server keeps the recent ones


@dataclass
class _Queued:
    request: object  # protocol.Request
    tokens: int
    arrived: float  # monotonic seconds
    round_at_arrival: int  # rounds formed before it arrived


@dataclass
class StudentLatency:
    """Per student: how long its requests waited, in rounds (0: in the first round formed after it arrived)
    and in seconds (from taken in to replied)."""

    rounds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_LATENCIES_KEPT))
    seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_LATENCIES_KEPT))


class StudentQueues:
    """The head's queue: a lane per student, fair rounds, per-student in-flight limits, a batching window."""

    def __init__(self, max_tokens: int, max_in_flight: int, max_wait_s: float, max_requests: int = 64,
                 clock: Callable[[], float] = time.monotonic):
        if max_in_flight < 1:
            raise ValueError(f"serve.max_in_flight_per_student must be >= 1, got {max_in_flight}")
        if max_wait_s < 0:
            raise ValueError(f"serve.max_wait_ms must be >= 0, got {max_wait_s * 1000}")
        self.max_tokens, self.max_in_flight, self.max_wait_s = max_tokens, max_in_flight, max_wait_s
        self.max_requests = max_requests
        self.clock = clock
        self.lanes: dict = {}  # student id -> deque of _Queued, in arrival order
        self.in_flight: dict = collections.Counter()  # student id -> queued + being scored
        self.names: dict = {}  # student id -> the student's rank (shm channel ids are not ranks)
        self.latency: dict = collections.defaultdict(StudentLatency)  # student rank -> StudentLatency
        self.rounds = 0
        self._next_start = 0
        self._running: dict = {}  # id(request) -> (_Queued, student id)

    # ---- in -------------------------------------------------------------------------------------------------
    def allowance(self, student) -> int:
        """How many more requests of `student` the queue takes now (Endpoint.poll's `allowance`)."""
        return max(self.max_in_flight - self.in_flight[student], 0)

    def add(self, request) -> None:
        b, s = request.tokens.shape
        lane = self.lanes.setdefault(request.student, collections.deque())
        lane.append(_Queued(request, int(b) * int(s), self.clock(), self.rounds))
        self.in_flight[request.student] += 1

    def sync(self, connected: dict) -> list:
        """Forget the students that are no longer connected (`connected`: student id -> rank); their queued
        requests, dropped (the caller tells the transport, which may be keeping their place in line)."""
        self.names.update(connected)
        dropped = []
        for student in [s for s in self.lanes if s not in connected]:
            lane = self.lanes.pop(student)
            if lane:
                log.warning("student %s left with %d requests queued: dropped", self.names.get(student, student),
                            len(lane))
            dropped += [q.request for q in lane]
            self.in_flight.pop(student, None)
        return dropped

    # ---- the window -----------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return sum(len(lane) for lane in self.lanes.values())

    @property
    def queued_tokens(self) -> int:
        return sum(q.tokens for lane in self.lanes.values() for q in lane)

    def oldest(self) -> Optional[float]:
        heads = [lane[0].arrived for lane in self.lanes.values() if lane]
        return min(heads) if heads else None

    def ready(self) -> bool:
        """A round should be formed now: a full round's tokens (or requests) are queued, or the oldest request
        has waited the whole window."""
        oldest = self.oldest()
        if oldest is None:
            return False
        return (self.queued_tokens >= self.max_tokens or self.depth >= self.max_requests
                or self.clock() - oldest >= self.max_wait_s)

    def wait_s(self) -> float:
        """How long the head may still wait for more requests before it must form a round (inf: nothing queued)."""
        oldest = self.oldest()
        return float("inf") if oldest is None else max(oldest + self.max_wait_s - self.clock(), 0.0)

    # ---- out ------------------------------------------------------------------------------------------------
    def take(self) -> list:
        """The next round: requests round-robin across students within the token budget (at least one)."""
        order = sorted(s for s, lane in self.lanes.items() if lane)
        if not order:
            return []
        start = self._next_start % len(order)
        order = order[start:] + order[:start]
        self._next_start = start + 1
        out, tokens = [], 0
        while len(out) < self.max_requests:
            took = False
            for student in order:
                lane = self.lanes[student]
                if not lane or len(out) >= self.max_requests:
                    continue
                if out and tokens + lane[0].tokens > self.max_tokens:
                    continue
                q = lane.popleft()
                out.append(q.request)
                tokens += q.tokens
                self._running[id(q.request)] = (q, student)
                took = True
            if not took:
                break
        self.rounds += 1
        return out

    def done(self, requests: list) -> None:
        """The round's replies were handed to the transport: the requests leave their students' in-flight
        counts and their waits are recorded."""
        now = self.clock()
        for request in requests:
            q, student = self._running.pop(id(request))
            if student in self.lanes:  # not when the student left meanwhile
                self.in_flight[student] -= 1
            latency = self.latency[self.names.get(student, student)]
            latency.rounds.append(self.rounds - 1 - q.round_at_arrival)
            latency.seconds.append(now - q.arrived)


def percentile(values, q: float) -> float:
    """The q-th percentile (nearest rank) of `values`; nan for none."""
    values = sorted(values)
    if not values:
        return float("nan")
    rank = max(int(-(-q * len(values) // 100)) - 1, 0)
    return float(values[min(rank, len(values) - 1)])


class StatusLine:
    """The server's periodic status line: students connected, queue depth, tokens/s scored, batch fill (real
    tokens per forward over `max_tokens`, padding not counted), over the last interval."""

    def __init__(self, interval_s: float, max_tokens: int, clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.max_tokens, self.clock = interval_s, max_tokens, clock
        self._since = clock()
        self._tokens = self._forwards = self._requests = 0

    def count(self, tokens: int, forwards: int, requests: int) -> None:
        self._tokens += tokens
        self._forwards += forwards
        self._requests += requests

    def due(self) -> bool:
        return self.interval_s > 0 and self.clock() - self._since >= self.interval_s

    def line(self, students: int, queues: StudentQueues) -> str:
        now = self.clock()
        elapsed = max(now - self._since, 1e-9)
        fill = self._tokens / (self._forwards * self.max_tokens) if self._forwards else 0.0
        text = (f"serving {students} students: queue {queues.depth} requests ({queues.queued_tokens} tokens), "
                f"{self._tokens / elapsed:.0f} tokens/s, {self._requests / elapsed:.1f} requests/s, "
                f"batch fill {fill:.2f} ({self._forwards} forwards of <= {self.max_tokens} tokens)")
        self._since, self._tokens, self._forwards, self._requests = now, 0, 0, 0
        return text
