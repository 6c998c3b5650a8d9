"""The two ends of a streaming transport, as the rest of the package uses them: `Channel` (a student's end:
`shm.ShmClient`, `dist_client.DistClient`; used by `RemoteTeacher`) and `Endpoint` (a teacher replica head's
end: `shm_server.ShmServer`, `dist_server.DistServer`; used by `kd-teacher serve`)."""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

from kd_teacher.payload import TopKPayload
from kd_teacher.transport.protocol import ServerInfo

# (seq, payload, None) for a payload, (seq, None, error text) for a refusal, (seq, None, None) for a stale reply
Reply = tuple[int, Optional[TopKPayload], Optional[str]]


class Channel(Protocol):
    """A student's end: connected at construction (the handshake gave `info`), then requests out and replies in,
    each reply matched to its request by sequence number."""

    info: ServerInfo

    def send(self, seq: int, tokens: torch.Tensor, sample_ids: Optional[list], request_id: Optional[str],
             deadline: float) -> None:
        """Send request `seq` for `tokens` [b, s] (int64, CPU); raises a TransportError by `deadline`."""

    def receive(self, deadline: float) -> Optional[Reply]:
        """The next reply (checked against its request's shape and the handshake), or None at the deadline."""

    def close(self) -> None:
        ...


class Endpoint(Protocol):
    """A teacher replica head's end: requests in, exactly one reply per request out."""

    def poll(self, timeout: float, max_requests: int = 64,
             allowance: Optional[Callable[[int], int]] = None) -> list:
        """`protocol.Request`s and (student, seq, error text) triples for requests refused on arrival (seq -1: the
        endpoint answered it already), waiting up to `timeout` for the first. `allowance(student)`: how many more
        of that student's requests the caller takes now; the rest wait in the transport (backpressure on that
        student alone)."""

    def payload_views(self, student: int, seq: int) -> Optional[tuple]:
        """(values, indices, lse) to write request `seq`'s payload into so that it goes out without a copy, or
        None (the endpoint copies the payload it is given)."""

    def reply(self, student: int, seq: int, payload: Optional[TopKPayload] = None, error: Optional[str] = None) -> None:
        ...

    def flush(self) -> None:
        """Move replies along while no request is waiting."""

    def connected(self) -> dict:
        """Student id (as this endpoint's Requests carry it in `student`) -> the student's rank, for the students
        connected now; a student that is gone no longer appears."""

    def finished(self) -> bool:
        """True once no student can send any more requests."""

    def close(self) -> None:
        ...
