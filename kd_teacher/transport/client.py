"""`RemoteTeacher`: the student's client of a streaming teacher, over shared memory or torch.distributed.

    teacher = RemoteTeacher(RemoteTeacherConfig(transport="shm", name="kd", k=64, temperature=1.0))
    h = teacher.submit(tokens_next, sample_ids)      # goes out now; the teacher works while we compute
    ...
    payload = teacher.result(h, timeout=30)          # TopKPayload for exactly tokens_next, or an error
    payload = teacher.score(tokens)                  # submit + result

At most `max_in_flight` requests are out at a time (backpressure): a further `submit` first takes in replies
(keeping them for their `result`) until one is back. Every reply is matched to its request by sequence
number and checked against the request's tokens (the hashes computed once at submit against the reply
header's, `TopKPayload.check_token_hashes`) before it is returned; a reply
for a request whose wait already timed out (a stale one) is discarded. Errors are those of
`kd_teacher.transport.protocol`: TeacherUnavailableError (dead / hung / restarted teacher; TeacherTimeoutError
when the timeout passed), IncompatibleTeacherError at connect, RequestRejectedError for a bad request.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch

from kd_teacher.config import from_dict
from kd_teacher.contract import TeacherContract
from kd_teacher.payload import PayloadError, TopKPayload, check_token_ids, token_hashes
from kd_teacher.transport import protocol as P
from kd_teacher.transport.channel import Channel

log = logging.getLogger(__name__)

_ABANDONED_KEPT = 4096


def _hash_threads() -> int:
    """Threads that hash request tokens: 2 where cores are to spare, else none (hashed on the caller's thread).
    One BLAKE2b of 8k int64 ids takes 70-160 us of CPU, as long as a 3 MB NVLink transfer; hashlib lets the GIL
    go meanwhile, so on idle cores it runs beside the transport. On 2 cores the threads only add switching
    (measured: shm x0.28 -> x0.21 with 4 threads on a 2-core machine)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 if cores >= 4 else 0


@dataclass(kw_only=True)
class RemoteTeacherConfig(TeacherContract):
    """The student side of the streaming teacher (the `kd.remote:` block). Its `TeacherContract` fields (k,
    temperature, vocab_size, fingerprints, ...) are what the loss needs: the teacher is refused at connect
    unless it serves exactly that (None: any)."""

    transport: Literal["shm", "dist"] = "shm"
    # shm: the server's name (`serve.name` of the teacher)
    name: str = "kd-teacher"
    # dist: the KD rendezvous host:port; the teacher (replica 0's head) hosts the store there, students connect
    address: str = "127.0.0.1:29600"
    backend: Optional[Literal["gloo", "nccl"]] = None  # None: nccl with CUDA, else gloo
    # This student's rank and the number of student ranks; None: the default world's rank and size. Over dist
    # num_students is advisory: students join one by one; the server ends once that many ranks have left.
    student_rank: Optional[int] = None
    num_students: Optional[int] = None
    # Seconds a result may take; a dead or frozen teacher is declared after heartbeat_timeout_s.
    timeout_s: float = 300.0
    heartbeat_timeout_s: float = 30.0
    connect_timeout_s: float = 600.0
    max_in_flight: int = 4
    # Also run TopKPayload.validate() (finite values, ids in range) on every payload; token hashes, shapes
    # and sizes are always checked.
    validate_payloads: bool = False
    # Where payloads land: None: the current CUDA device with NCCL, else the CPU.
    device: Optional[str] = None
    # shm: also crc32 every slot's data (both directions); None: only where stores may be seen out of order
    # (not x86). Slot headers are always hashed; see kd_teacher/transport/shm.py.
    shm_verify_data: Optional[bool] = None

    def __post_init__(self):
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.timeout_s <= 0 or self.heartbeat_timeout_s <= 0:
            raise ValueError("timeout_s and heartbeat_timeout_s must be positive")


@dataclass
class Handle:
    seq: int


@dataclass
class _Pending:
    tokens: torch.Tensor
    sample_ids: Optional[list]
    shape: tuple
    hashes: Future  # the tokens' hashes (a list), computed once, from submit on, off the caller's thread
    done: Optional[TopKPayload] = None
    error: Optional[Exception] = None
    abandoned: bool = False
    sent_at: float = field(default_factory=time.monotonic)


class RemoteTeacher:
    def __init__(self, config: RemoteTeacherConfig):
        self.config = config
        self.channel: Channel = self._connect(config)
        self.info = self.channel.info
        self._seq = 0
        self._requests: "OrderedDict[int, _Pending]" = OrderedDict()
        self.stale_discarded = 0
        threads = _hash_threads()
        self._hashing = ThreadPoolExecutor(threads, thread_name_prefix="kd-token-hash") if threads else None

    @staticmethod
    def _connect(cfg: RemoteTeacherConfig) -> Channel:
        rank, size = cfg.student_rank, cfg.num_students
        if rank is None or size is None:
            import torch.distributed as dist

            initialised = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
            size = size if size is not None else (dist.get_world_size() if initialised else 1)
        if cfg.transport == "shm":
            from kd_teacher.transport.shm import ShmClient

            return ShmClient(cfg.name, rank, cfg.contract(), slots=cfg.max_in_flight,
                             connect_timeout_s=cfg.connect_timeout_s, heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                             device=cfg.device, verify_data=cfg.shm_verify_data)
        from kd_teacher.transport.dist_client import DistClient

        # Timed-out requests keep their reply receives posted until the late replies come: room for as many.
        return DistClient(cfg.address, rank, size, cfg.contract(), backend=cfg.backend,
                          connect_timeout_s=cfg.connect_timeout_s, heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                          device=cfg.device, max_outstanding=2 * cfg.max_in_flight)

    # ---- the interface the training hook uses ----------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return sum(1 for p in self._requests.values() if p.done is None and p.error is None and not p.abandoned)

    def submit(self, tokens: torch.Tensor, sample_ids: Optional[Sequence[int]] = None,
               request_id: Optional[str] = None) -> Handle:
        """Send a request for `tokens` [b, s]; returns at once unless `max_in_flight` requests are out."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.numel() == 0:
            raise P.RequestRejectedError(f"tokens must be a non-empty [batch, seq] tensor, got "
                                         f"{getattr(tokens, 'shape', type(tokens))}")
        if sample_ids is not None and len(sample_ids) != tokens.shape[0]:
            raise P.RequestRejectedError(f"{len(sample_ids)} sample ids for {tokens.shape[0]} sequences")
        check_token_ids(tokens)  # before the int64 copy below, which would truncate float ids
        deadline = time.monotonic() + self.config.timeout_s
        while self.in_flight >= self.config.max_in_flight:
            try:
                progressed = self._take_one(deadline)
            except P.TeacherUnavailableError as e:
                self._fail_all(e)
                raise
            if not progressed:
                raise P.TeacherTimeoutError(
                    f"no reply within {self.config.timeout_s} s while {self.in_flight} requests are in flight"
                )
        self._seq += 1
        seq = self._seq
        # A copy: the request may be read after we return (torch.distributed sends it asynchronously, the
        # hashes come from another thread), while the caller is free to reuse its tensor.
        cpu_tokens = tokens.detach().to("cpu", torch.int64, copy=True)
        ids = None if sample_ids is None else [int(i) for i in sample_ids]
        self.channel.send(seq, cpu_tokens, ids, request_id, deadline)
        # On a thread of ours where cores are to spare: the caller goes on while the tokens are hashed; the
        # hashes are compared with the reply's when it comes.
        self._requests[seq] = _Pending(cpu_tokens, ids, tuple(tokens.shape), self._hash(cpu_tokens))
        return Handle(seq)

    def result(self, handle: Handle, timeout: Optional[float] = None) -> TopKPayload:
        """The payload of `handle`, waiting at most `timeout` seconds (default: the config's timeout_s)."""
        pending = self._requests.get(handle.seq)
        if pending is None or pending.abandoned:
            raise KeyError(f"request {handle.seq} is unknown or its result was already taken / given up")
        timeout = self.config.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while pending.done is None and pending.error is None:
            try:
                progressed = self._take_one(deadline)
            except P.TeacherUnavailableError as e:
                self._fail_all(e)
                break
            if not progressed and time.monotonic() >= deadline:
                pending.abandoned = True
                raise P.TeacherTimeoutError(f"no reply to request {handle.seq} within {timeout:.3g} s "
                                            "(a late reply will be discarded)")
        self._requests.pop(handle.seq)
        if pending.error is not None:
            raise pending.error
        return pending.done

    def score(self, tokens: torch.Tensor, *, sample_ids: Optional[Sequence[int]] = None,
              request_id: Optional[str] = None) -> TopKPayload:
        return self.result(self.submit(tokens, sample_ids, request_id))

    def cancel(self, handle: Handle) -> None:
        """Give up on `handle`: it stops counting against `max_in_flight` and its reply is discarded."""
        pending = self._requests.get(handle.seq)
        if pending is None:
            return
        if pending.done is not None or pending.error is not None:
            self._requests.pop(handle.seq)
            return
        pending.abandoned = True
        self._trim_abandoned()

    def close(self) -> None:
        self.channel.close()
        if self._hashing is not None:
            self._hashing.shutdown(wait=False)

    def _hash(self, tokens: torch.Tensor) -> Future:
        if self._hashing is not None:
            return self._hashing.submit(token_hashes, tokens)
        done: Future = Future()
        done.set_result(token_hashes(tokens))
        return done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- taking in replies ----------------------------------------------------------------------------------
    def _take_one(self, deadline: float) -> bool:
        """Take in one reply (for any request); False when the deadline passed first."""
        item = self.channel.receive(deadline)
        if item is None:
            return False
        seq, payload, error = item
        pending = self._requests.get(seq)
        if pending is None or pending.abandoned:
            self.stale_discarded += 1
            self._requests.pop(seq, None)
            log.debug("discarded a stale reply to request %d", seq)
            return True
        if error is not None:
            pending.error = P.RequestRejectedError(f"the teacher rejected request {seq}: {error}")
        else:
            try:
                pending.done = self._checked(payload, pending)
            except PayloadError as e:
                pending.error = e
        self._trim_abandoned()
        return True

    def _checked(self, payload: TopKPayload, pending: _Pending) -> TopKPayload:
        payload.check_token_hashes(pending.shape, pending.hashes.result(), pending.sample_ids)
        # The transport checked the layout (k, vocab, T, dtype) against the handshake; this is whose it is.
        payload.header.check(self.info, served="the reply", expecting="the teacher at connect", error=PayloadError)
        if self.config.validate_payloads:
            payload.validate()
        return payload

    def _fail_all(self, error: Exception) -> None:
        """The teacher is gone: every request still waiting fails with the same error."""
        for seq, p in self._requests.items():
            if p.done is None and p.error is None and not p.abandoned:
                p.error = type(error)(f"request {seq} lost: {error}")

    def _trim_abandoned(self) -> None:
        abandoned = [s for s, p in self._requests.items() if p.abandoned]
        for seq in abandoned[:max(0, len(abandoned) - _ABANDONED_KEPT)]:
            self._requests.pop(seq)


def make_client(remote: Optional[dict] = None, *, k: Optional[int] = None, temperature: Optional[float] = None,
                vocab_size: Optional[int] = None, timeout_s: Optional[float] = None) -> RemoteTeacher:
    """A RemoteTeacher from the `kd.remote:` mapping; the KD loss's k / T / vocabulary become requirements."""
    data = dict(remote or {})
    for key, value in (("k", k), ("temperature", temperature), ("vocab_size", vocab_size), ("timeout_s", timeout_s)):
        if value is not None and key not in data:
            data[key] = value
    return RemoteTeacher(from_dict(RemoteTeacherConfig, data, "kd.remote"))
