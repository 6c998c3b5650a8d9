"""The serving queue on its own (`kd_teacher.serve_batching`): fair rounds within the token budget, the batching
window, per-student in-flight limits and students that leave. A fake clock: no waiting, nothing to flake."""

from __future__ import annotations

import torch

from kd_teacher.serve_batching import StatusLine, StudentQueues, percentile
from kd_teacher.transport.protocol import Request


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _req(student: int, seq: int, b: int = 1, s: int = 16) -> Request:
    return Request(student, seq, torch.zeros(b, s, dtype=torch.long), None, None)


def test_rounds_are_round_robin_within_the_budget_so_a_flood_does_not_starve_a_single_request():
    q = StudentQueues(max_tokens=64, max_in_flight=100, max_wait_s=0.0, clock=Clock())
    for seq in range(20):
        q.add(_req(0, seq))  # student 0 floods: 20 x 16 tokens
    q.add(_req(1, 0))  # student 1: one request
    first = q.take()
    assert sum(r.tokens.numel() for r in first) <= 64 and len(first) == 4
    assert [(r.student, r.seq) for r in first if r.student == 1] == [(1, 0)]
    q.done(first)
    # the flooder gets every slot the others leave free, in its own order
    assert [(r.student, r.seq) for r in q.take()] == [(0, 3), (0, 4), (0, 5), (0, 6)]
    # a request bigger than the budget still forms a round of its own
    q.add(_req(2, 0, b=8, s=16))
    while q.depth:
        round_ = q.take()
        assert len(round_) >= 1
        if any(r.student == 2 for r in round_):
            assert len(round_) == 1
        q.done(round_)
    assert q.latency[1].rounds[0] == 0  # served in the first round formed after it arrived


def test_window_and_in_flight_limit():
    clock = Clock()
    q = StudentQueues(max_tokens=64, max_in_flight=2, max_wait_s=0.005, clock=clock)
    assert not q.ready() and q.wait_s() == float("inf")
    q.add(_req(0, 0))
    assert not q.ready() and abs(q.wait_s() - 0.005) < 1e-12  # a partial round waits for the window
    clock.now = 0.005
    assert q.ready()  # ... and no longer than the window
    assert q.allowance(0) == 1 and q.allowance(1) == 2
    q.add(_req(0, 1))
    assert q.allowance(0) == 0  # the rest of student 0's requests wait in its transport
    round_ = q.take()
    assert q.allowance(0) == 0  # being scored still counts
    q.done(round_)
    assert q.allowance(0) == 2
    for seq in range(4):
        q.add(_req(1, seq))
    assert q.ready()  # a full round's tokens: no waiting for the window


def test_a_student_that_leaves_loses_its_queued_requests_and_a_restart_gets_a_new_lane():
    q = StudentQueues(max_tokens=64, max_in_flight=8, max_wait_s=0.0, clock=Clock())
    q.sync({1: 0, 2: 1})
    for seq in range(3):
        q.add(_req(1, seq))
        q.add(_req(2, seq))
    dropped = q.sync({2: 1, 3: 0})  # channel 1 (rank 0) is gone; rank 0 came back as channel 3
    assert sorted((r.student, r.seq) for r in dropped) == [(1, 0), (1, 1), (1, 2)]
    q.add(_req(3, 0))
    taken = q.take()
    assert {r.student for r in taken} == {2, 3}
    q.done(taken)
    assert set(q.latency) == {0, 1}  # recorded per student rank, across the restart


def test_status_line_and_percentile():
    clock = Clock()
    status = StatusLine(10.0, 64, clock=clock)
    q = StudentQueues(64, 8, 0.0, clock=clock)
    status.count(tokens=96, forwards=2, requests=6)
    assert not status.due()
    clock.now = 10.0
    assert status.due()
    line = status.line(3, q)
    assert "serving 3 students" in line and "10 tokens/s" in line and "batch fill 0.75" in line
    assert percentile([3, 1, 2, 10], 50) == 2 and percentile(list(range(100)), 99) == 98
