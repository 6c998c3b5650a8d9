"""Shared-memory transport: a teacher server process and student processes on one node, through /dev/shm.

Files (all created 0600 under a temporary name, then renamed into place, so nobody maps a half-written one;
a segment that is not ours or not 0600 is refused):
  kdt-<name>.s<r>           one per teacher replica r: magic, generation, pid, heartbeat, ServerInfo JSON
  kdt-<name>.c<i>-<pid>-<r> one per student channel (i = its rank): the hello / verdict handshake, two rings of
                            fixed-size slots, requests (student -> server) and replies (server -> student)

A ring has `slots` slots and two counters, written (by the producer) and consumed (by the consumer); slot
seq % slots holds message seq. A slot is a 64-byte slot header [u64 seq | u64 length | u64 meta length |
u32 meta hash | u32 flags | u32 data crc] and the message: a JSON header (the request, or the reply with the
payload header and its token hashes; padded with spaces to 64 bytes) and the raw buffers (tokens; or the
payload's indices, lse, values: each 4-byte aligned, so the student's one buffer is viewed without copies).

One copy per side. The producer copies each tensor straight into the slot (`Tensor.copy_` into a view of the
mapping: no bytes object in between); the student copies the reply's buffers out in one `copy_` into one
buffer on its device (the CPU, or the GPU directly) that the payload's tensors are views of (on the CPU a
reused one, `buffers.HostBuffers`, lent until the payload is dropped: a fresh 2 MB buffer a message costs page
faults); the server copies the
(small) token ids out.

Torn or stale slots: a seqlock plus a per-slot hash of the slot header, not a checksum of every byte.
  producer: slot seq = 0 (being written) -> message -> length, hashes -> slot seq = seq -> `written` = seq
  consumer: `written` >= seq -> slot seq == seq -> meta hash (crc32 of seq, length, flags, data crc and the
            JSON header, token hashes included) -> parse -> copy out -> slot seq still == seq -> `consumed`
Why that is enough: each ring has a single writer, and the writer never touches a slot the consumer has not
released (`consumed`), so a slot cannot change under a reader that follows the counters. What is left is the
order in which the reader sees the writer's stores: on x86-64 (TSO) stores become visible to other cores in
program order (glibc's non-temporal memcpy ends in sfence), and CPython runs the `seq` store only after the
copy returned, so a reader that sees the slot's seq sees the whole message. The meta hash catches a slot
header or JSON that is not what was written (a stale slot, a foreign writer, bit flips in the part that
decides what the bytes mean); the seq re-check after the copy catches a second writer (a replaced server
that resumed: it also stops writing once it sees the channel attached to another generation). Where stores
may become visible out of order (ARM, POWER) the default turns on `verify_data`: a crc32 of the buffers,
written by the producer and checked (with retries while it does not match yet) by the consumer; it is also
the debugging switch (`RemoteTeacherConfig.shm_verify_data`, kept in the channel file, so both directions of
that student's channel use it). The crc costs about 0.5 ms per 2 MB on each side, ten times the copy: that
is why it is not the default. Whatever the slot check, the student matches every payload to its request's
tokens by their hashes (RemoteTeacher), so a payload for other tokens is never used.

Waiting: a side that waits for the other yields its core (sched_yield) for the first 2 ms, then sleeps with
doubling pauses up to 1-2 ms: a sleep of 50 us costs over 100 us on Linux, longer than a 2 MB copy.

Measured (benchmarks/stream.py --preset cpu, 2.1 MB replies, 2026-11-27): x0.64 of a raw copy of the same
bytes into and out of a /dev/shm mapping on an idle 32-core host, x0.2-0.4 on 2 shared cores, swinging with
their load (was x0.06 with a crc32 of every slot and bytes copies). In one process with a hot one-slot ring a
message costs each side about what both raw copies cost together (its own copy, plus the JSON header and
Python); the token hashes run on threads of their own where cores are to spare (RemoteTeacher; the engine
hashes while its forward runs). The raw copies also reuse one cache-hot buffer, where a ring of 2 MB slots
goes cold.

Students own their channel files, so a restarted server (same name) finds them again: it re-reads each hello,
writes a new verdict under its new generation, and serves on from the counters it finds. A student notices a
server that died (pid gone), was replaced (another file behind the name) or hangs (heartbeat frozen) and fails
its waiting requests with TeacherUnavailableError; its next request waits for a server to attach it again.
Student i is served by replica i % replicas.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import mmap
import os
import platform
import re
import secrets
import struct
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import torch

from kd_teacher.contract import TeacherContract
from kd_teacher.dtypes import DTYPES
from kd_teacher.payload import parse_json
from kd_teacher.transport import protocol as P
from kd_teacher.transport.buffers import HostBuffers

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_SERVER_MAGIC = b"KDSHMSV1"
_CHANNEL_MAGIC = b"KDSHMCH2"  # 2: seqlock slots with a meta hash (1 had a crc32 of every byte)
_SERVER_BYTES = 64 + 65536
_U64 = struct.Struct("<Q")
_SLOT = struct.Struct("<QQQIII")  # seq, length, meta length, meta hash, flags, data crc
_SLOT_HASHED = struct.Struct("<QQQII")  # what the meta hash covers besides the JSON: seq, lengths, flags, crc
_SLOT_HEADER = 64
_ALIGN = 64  # slots and buffers start on cache lines
_DATA_CRC = 1  # slot flag: the data crc covers the buffers
_MAX_META = 1 << 20
_HELLO_AT, _HELLO_MAX = 128, 1920
_VERDICT_AT, _VERDICT_MAX = 2048, 2048
_RINGS_AT = 4096
# channel header fields (byte offsets)
_SLOTS, _REQ_BYTES, _REP_BYTES = 8, 16, 24
_REQ_WRITTEN, _REQ_CONSUMED, _REP_WRITTEN, _REP_CONSUMED = 32, 40, 48, 56
_ATTACHED_GEN, _VERDICT_LEN, _HELLO_LEN, _FLAGS = 64, 72, 80, 88
# server header fields
_GEN, _PID, _HEARTBEAT, _INFO_LEN, _INFO_AT = 8, 16, 24, 32, 64
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
# channel files kdt-<name>.c<rank>-<pid>-<hex>, half-made segments <file>.tmp-<pid>
_OWNED_NAME_RE = re.compile(r"\.c\d+-(\d+)-[0-9a-f]+$|\.tmp-(\d+)$")
_WAIT_LOG_S = 10.0  # a student waiting for a teacher server says so this often
_SLOTS_REMEMBERED = 4096  # request ring numbers -> request seqs kept for error replies named by slot


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"shared-memory name {name!r} must be 1-100 characters of [A-Za-z0-9_.-]")
    return name


def server_path(name: str, replica: int) -> Path:
    return SHM_DIR / f"kdt-{_check_name(name)}.s{replica}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# ---- segments ---------------------------------------------------------------------------------------------------
def _create(path: Path, size: int) -> tuple[mmap.mmap, Path]:
    """A new 0600 segment under a temporary name; `os.rename(tmp, path)` publishes it."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size), tmp
    finally:
        os.close(fd)


def _open_owned(path: Path) -> tuple[mmap.mmap, int]:
    """Map an existing segment after checking it is ours and private; returns (map, inode)."""
    fd = os.open(path, os.O_RDWR)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise P.ProtocolError(
                f"refusing shared-memory segment {path}: owner uid {st.st_uid}, mode {oct(st.st_mode & 0o777)} "
                f"(must be uid {os.getuid()}, 0600)"
            )
        return mmap.mmap(fd, st.st_size), st.st_ino
    finally:
        os.close(fd)


def _get(mm, at: int) -> int:
    return _U64.unpack_from(mm, at)[0]


def _put(mm, at: int, value: int) -> None:
    _U64.pack_into(mm, at, value)


def _put_json(mm, at: int, limit: int, len_at: int, obj) -> None:
    text = json.dumps(obj).encode()
    if len(text) > limit:
        raise P.ProtocolError(f"handshake message of {len(text)} bytes exceeds its {limit}-byte field")
    mm[at:at + len(text)] = text
    _put(mm, len_at, len(text))


def _get_json(mm, at: int, limit: int, len_at: int):
    n = _get(mm, len_at)
    if n == 0 or n > limit:
        raise P.ProtocolError(f"handshake field length {n} outside [1, {limit}]")
    return parse_json(bytes(mm[at:at + n]), P.ProtocolError, "handshake field")


# ---- waiting ----------------------------------------------------------------------------------------------------
class _Wait:
    """Pauses of one wait for the other process: sched_yield for the first `spin_s` (the peer, busy on its own
    core, answers within tens of microseconds), then sleeps doubling from 50 us up to `max_sleep_s`."""

    def __init__(self, spin_s: float = 0.002, max_sleep_s: float = 0.001):
        self.spin_until = time.monotonic() + spin_s
        self.pause, self.max_sleep_s = 0.00005, max_sleep_s

    def __call__(self) -> None:
        if time.monotonic() < self.spin_until:
            os.sched_yield()
            return
        time.sleep(self.pause)
        self.pause = min(self.pause * 2, self.max_sleep_s)


# ---- rings ------------------------------------------------------------------------------------------------------
def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _meta(header: dict, sizes: list[int]) -> bytes:
    """The JSON header of a message with its buffer sizes, padded with spaces so the buffers start aligned."""
    text = json.dumps(dict(header, buffers=sizes), separators=(",", ":")).encode()
    return text + b" " * (_round_up(len(text)) - len(text))


def _meta_hash(seq: int, length: int, meta_len: int, flags: int, data_crc: int, meta) -> int:
    return zlib.crc32(meta, zlib.crc32(_SLOT_HASHED.pack(seq, length, meta_len, flags, data_crc)))


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class _Ring:
    """One direction of a channel: `slots` fixed-size slots and the written/consumed counters."""

    def __init__(self, mm: mmap.mmap, raw: torch.Tensor, base: int, slots: int, slot_bytes: int, written_at: int,
                 consumed_at: int, verify_data: bool):
        self.mm, self.raw, self.base, self.slots, self.slot_bytes = mm, raw, base, slots, slot_bytes
        self.written_at, self.consumed_at, self.verify_data = written_at, consumed_at, verify_data
        self.view = memoryview(mm)

    @property
    def stride(self) -> int:
        return _SLOT_HEADER + _round_up(self.slot_bytes)

    def _slot(self, seq: int) -> int:
        return self.base + ((seq - 1) % self.slots) * self.stride

    def free(self) -> bool:
        return _get(self.mm, self.written_at) - _get(self.mm, self.consumed_at) < self.slots

    def written(self) -> int:
        return _get(self.mm, self.written_at)

    def next_seq(self) -> int:
        """The number of the next message `take` reads."""
        return _get(self.mm, self.consumed_at) + 1

    def pending(self) -> bool:
        return _get(self.mm, self.consumed_at) < _get(self.mm, self.written_at)

    def fits(self, meta: bytes, sizes: list[int]) -> bool:
        return len(meta) + sum(sizes) <= self.slot_bytes

    # ---- producer ---------------------------------------------------------------------------------------------
    def put(self, meta: bytes, buffers: list[torch.Tensor]) -> None:
        """Write the next message (`_meta` header + buffers); the caller checked `free()` and `fits()`."""
        sizes = [t.numel() * t.element_size() for t in buffers]
        seq = _get(self.mm, self.written_at) + 1
        at = self._slot(seq)
        data_at = at + _SLOT_HEADER
        length = len(meta) + sum(sizes)
        _put(self.mm, at, 0)  # seqlock: the slot is being written
        self.view[data_at:data_at + len(meta)] = meta
        pos = data_at + len(meta)
        for t, n in zip(buffers, sizes):
            if n:
                self.raw[pos:pos + n].copy_(_byte_view(t))  # the one copy: tensor (CPU or GPU) -> slot
            pos += n
        flags, data_crc = 0, 0
        if self.verify_data:
            flags, data_crc = _DATA_CRC, zlib.crc32(self.view[data_at + len(meta):data_at + length])
        meta_hash = _meta_hash(seq, length, len(meta), flags, data_crc, meta)
        _SLOT.pack_into(self.mm, at, 0, length, len(meta), meta_hash, flags, data_crc)
        _put(self.mm, at, seq)  # last: a reader that sees it sees the whole slot (see the module docstring)
        _put(self.mm, self.written_at, seq)

    # ---- consumer ---------------------------------------------------------------------------------------------
    def take(self, parse: Callable[[dict, list, torch.Tensor], object], retry_s: float = 0.05):
        """parse(header, buffer memoryviews, uint8 tensor view of all buffers) for the next message, then release
        the slot; None if none is pending. The views point into the slot: parse copies what it keeps."""
        if not self.pending():
            return None
        seq = _get(self.mm, self.consumed_at) + 1
        at = self._slot(seq)
        deadline = time.monotonic() + retry_s
        try:
            while True:
                problem = self._check(at, seq)
                if problem is None:
                    result = parse(*self._message(at))
                    if _get(self.mm, at) == seq:  # seqlock: nobody rewrote the slot while we copied out
                        return result
                    problem = "rewritten while it was read"
                if time.monotonic() > deadline:
                    raise P.ProtocolError(f"shared-memory slot for message {seq} is corrupt ({problem})")
                time.sleep(0.0005)  # the producer's writes are not all visible yet (verify_data on weak orders)
        finally:
            _put(self.mm, self.consumed_at, seq)

    def _check(self, at: int, seq: int) -> Optional[str]:
        """None if the slot holds message `seq` as written, else what is wrong with it."""
        got, length, meta_len, meta_hash, flags, data_crc = _SLOT.unpack_from(self.mm, at)
        if got != seq:
            return f"slot seq {got}"
        if not meta_len <= min(length, _MAX_META) or length > self.slot_bytes:
            return f"lengths {meta_len}/{length} outside the {self.slot_bytes}-byte slot"
        data_at = at + _SLOT_HEADER
        meta = self.view[data_at:data_at + meta_len]
        if _meta_hash(seq, length, meta_len, flags, data_crc, meta) != meta_hash:
            return "slot header hash mismatch"
        if flags & _DATA_CRC and zlib.crc32(self.view[data_at + meta_len:data_at + length]) != data_crc:
            return "data crc mismatch"
        return None

    def _message(self, at: int) -> tuple[dict, list, torch.Tensor]:
        """The checked slot's header and buffer views; ProtocolError if its (hash-verified) JSON is malformed."""
        _, length, meta_len = _SLOT.unpack_from(self.mm, at)[:3]
        data_at = at + _SLOT_HEADER
        header = parse_json(bytes(self.view[data_at:data_at + meta_len]), P.ProtocolError,
                              "shared-memory message header")
        if not isinstance(header, dict):
            raise P.ProtocolError(f"shared-memory message header is a JSON {type(header).__name__}, not an object")
        sizes = header.get("buffers")
        if (not isinstance(sizes, list)
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes)
                or meta_len + sum(sizes) != length):
            raise P.ProtocolError(f"shared-memory message buffer sizes {sizes!r:.80} do not add up to its "
                                  f"{length - meta_len} bytes")
        pos, views = data_at + meta_len, []
        for n in sizes:
            views.append(self.view[pos:pos + n])
            pos += n
        return header, views, self.raw[data_at + meta_len:data_at + length]


def _rings(mm: mmap.mmap) -> tuple[_Ring, _Ring]:
    slots, req_bytes, rep_bytes = _get(mm, _SLOTS), _get(mm, _REQ_BYTES), _get(mm, _REP_BYTES)
    stride = 2 * _SLOT_HEADER + _round_up(req_bytes) + _round_up(rep_bytes)
    if not 1 <= slots <= 1024 or _RINGS_AT + slots * stride > len(mm):
        raise P.ProtocolError(f"channel geometry (slots {slots}, {req_bytes}/{rep_bytes} B) does not fit its file")
    raw = torch.frombuffer(mm, dtype=torch.uint8)
    verify = bool(_get(mm, _FLAGS) & _DATA_CRC)
    req = _Ring(mm, raw, _RINGS_AT, slots, req_bytes, _REQ_WRITTEN, _REQ_CONSUMED, verify)
    rep = _Ring(mm, raw, _RINGS_AT + slots * req.stride, slots, rep_bytes, _REP_WRITTEN, _REP_CONSUMED, verify)
    return req, rep


def _channel_bytes(slots: int, req_bytes: int, rep_bytes: int) -> int:
    return _RINGS_AT + slots * (2 * _SLOT_HEADER + _round_up(req_bytes) + _round_up(rep_bytes))


def default_verify_data() -> bool:
    """A crc of every slot's data where stores may become visible out of order (not x86): see the docstring."""
    return platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686")


def slot_sizes(info: P.ServerInfo) -> tuple[int, int]:
    """Request and reply slot bytes for the largest request the server accepts (and its header)."""
    n = info.max_tokens_per_request
    item = DTYPES[info.values_dtype].itemsize
    header_room = 65536 + 64 * n  # JSON: a 32-char hash and a sample id per sequence, at most n sequences
    return header_room + 8 * n, header_room + n * (info.k * (item + 4) + 4)


# ---- client -----------------------------------------------------------------------------------------------------
class ShmClient:
    """A student's end: its channel file, the handshake, and liveness checks of the server it is attached to."""

    def __init__(self, name: str, student: int, expect: TeacherContract, *, slots: int, connect_timeout_s: float,
                 heartbeat_timeout_s: float, device=None, verify_data: Optional[bool] = None):
        self.name, self.student, self.expect = _check_name(name), student, expect
        self.slots = slots
        self.verify_data = default_verify_data() if verify_data is None else verify_data
        self.connect_timeout_s, self.heartbeat_timeout_s = connect_timeout_s, heartbeat_timeout_s
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._buffers = HostBuffers(self.device)
        # A fresh file name per channel: a server that still holds this process's previous channel (closed,
        # not yet noticed) must see a new one, not the name it already attached.
        self.path = SHM_DIR / f"kdt-{name}.c{student}-{os.getpid()}-{secrets.token_hex(4)}"
        self.mm: Optional[mmap.mmap] = None
        self._server = None  # (map, inode, generation, pid) of the server we are attached to
        self._shapes: dict[int, tuple] = {}  # [b, s] of each request sent and not answered yet
        self._slot_seqs: "collections.OrderedDict[int, int]" = collections.OrderedDict()  # request ring -> seq
        self._beat = (0, 0.0)
        self._checked = 0.0
        self.info = self._connect(time.monotonic() + connect_timeout_s)

    # ---- connecting ---------------------------------------------------------------------------------------------
    def _open_server(self, replica: int, deadline: float):
        path = server_path(self.name, replica)
        started = logged = time.monotonic()
        while True:
            try:
                mm, ino = _open_owned(path)
                if bytes(mm[0:8]) == _SERVER_MAGIC and _get(mm, _GEN) and _pid_alive(_get(mm, _PID)):
                    info = P.ServerInfo.from_json(json.dumps(_get_json(mm, _INFO_AT, _SERVER_BYTES, _INFO_LEN)))
                    return mm, ino, info
                mm.close()
            except FileNotFoundError:
                pass
            except (ValueError, OSError) as e:
                log.debug("server segment %s not ready: %s", path, e)
            now = time.monotonic()
            if now > deadline:
                raise P.TeacherUnavailableError(f"no live teacher server at {path} (shared-memory name {self.name!r}) "
                                                f"within {now - started:.0f} s")
            if now - logged >= _WAIT_LOG_S:
                logged = now
                log.warning("student %d: waiting for a teacher server at %s (%.0f s so far, giving up in %.0f s)",
                            self.student, path, now - started, deadline - now)
            time.sleep(0.02)

    def _connect(self, deadline: float) -> P.ServerInfo:
        mm0, ino0, info = self._open_server(0, deadline)
        problems = P.incompatibilities(info, self.expect)
        if problems:
            mm0.close()
            raise P.IncompatibleTeacherError(f"teacher {self.name!r} refused: " + "; ".join(problems))
        replica = self.student % info.replicas
        if replica:
            mm0.close()
            mm0, ino0, info = self._open_server(replica, deadline)
        if self.mm is None:
            self._create_channel(info)
        gen, pid = _get(mm0, _GEN), _get(mm0, _PID)
        while _get(self.mm, _ATTACHED_GEN) != gen:
            if time.monotonic() > deadline or not _pid_alive(pid):
                mm0.close()
                raise P.TeacherUnavailableError(f"teacher server {self.name!r} (pid {pid}) did not attach this student")
            time.sleep(0.005)
        verdict = _get_json(self.mm, _VERDICT_AT, _VERDICT_MAX, _VERDICT_LEN)
        if not isinstance(verdict, dict) or not verdict.get("ok"):
            mm0.close()
            self.close()
            reason = verdict.get("reason") if isinstance(verdict, dict) else verdict
            raise P.IncompatibleTeacherError(f"teacher {self.name!r} refused this student: {reason}")
        self._server = (mm0, ino0, gen, pid)
        self._beat = (_get(mm0, _HEARTBEAT), time.monotonic())
        self.replica = replica
        return info

    def _create_channel(self, info: P.ServerInfo) -> None:
        req_bytes, rep_bytes = slot_sizes(info)
        mm, tmp = _create(self.path, _channel_bytes(self.slots, req_bytes, rep_bytes))
        mm[0:8] = _CHANNEL_MAGIC
        flags = _DATA_CRC if self.verify_data else 0
        for at, v in ((_SLOTS, self.slots), (_REQ_BYTES, req_bytes), (_REP_BYTES, rep_bytes), (_FLAGS, flags)):
            _put(mm, at, v)
        hello = {"student": self.student, "pid": os.getpid(), "expect": json.loads(self.expect.to_json())}
        _put_json(mm, _HELLO_AT, _HELLO_MAX, _HELLO_LEN, hello)
        os.rename(tmp, self.path)
        self.mm = mm
        self.req, self.rep = _rings(mm)

    # ---- liveness -----------------------------------------------------------------------------------------------
    def _check_server(self, force: bool = False) -> None:
        """Raise TeacherUnavailableError (and drop the attachment) if the server died, was replaced or hangs."""
        now = time.monotonic()
        if not force and now - self._checked < 0.01:
            return
        self._checked = now
        if self._server is None:
            raise P.TeacherUnavailableError(f"teacher server {self.name!r} is not attached")
        mm, ino, gen, pid = self._server
        problem = None
        if not _pid_alive(pid):
            problem = f"teacher server {self.name!r} (pid {pid}) died"
        else:
            try:
                replaced = os.stat(server_path(self.name, self.student % self.info.replicas)).st_ino != ino
            except FileNotFoundError:
                replaced = True
            if replaced or _get(self.mm, _ATTACHED_GEN) != gen:
                problem = f"teacher server {self.name!r} (pid {pid}) was stopped or restarted"
            else:
                beat = _get(mm, _HEARTBEAT)
                if beat != self._beat[0]:
                    self._beat = (beat, now)
                elif now - self._beat[1] > self.heartbeat_timeout_s:
                    problem = (f"teacher server {self.name!r} (pid {pid}) hangs: no heartbeat for "
                               f"{now - self._beat[1]:.1f} s")
        if problem:
            self._server = None
            self._shapes.clear()  # their replies will not come
            _close_map(mm)
            raise P.TeacherUnavailableError(problem)

    def _ensure_attached(self, deadline: float) -> None:
        if self._server is not None:
            return
        log.warning("student %d: teacher server %r is not attached; waiting for it up to %.1f s (the request's "
                    "timeout)", self.student, self.name, max(deadline - time.monotonic(), 0.0))
        info = self._connect(deadline)
        info.check(self.info, served="the restarted teacher", expecting="this student's channel",
                   error=P.IncompatibleTeacherError, identity=False)
        if slot_sizes(info) != (self.req.slot_bytes, self.rep.slot_bytes):
            raise P.IncompatibleTeacherError("the restarted teacher has another max_tokens_per_request")
        self.info = info
        log.info("student %d re-attached to teacher server %r", self.student, self.name)

    # ---- the channel interface -----------------------------------------------------------------------------------
    def send(self, seq: int, tokens: torch.Tensor, sample_ids, request_id, deadline: float) -> None:
        # Bounded by the request's own deadline (its timeout_s), not connect_timeout_s: a request sent while the
        # teacher is down fails like any request that gets no reply; the wait is logged.
        self._ensure_attached(deadline)
        header = {"type": "request", "student": self.student, "seq": seq, "shape": list(tokens.shape),
                  "sample_ids": None if sample_ids is None else [int(i) for i in sample_ids],
                  "request_id": request_id}
        tokens = tokens.detach().to("cpu", P.TOKEN_DTYPE)
        sizes = [tokens.numel() * tokens.element_size()]
        meta = _meta(header, sizes)
        if not self.req.fits(meta, sizes):
            raise P.RequestRejectedError(
                f"request of {tokens.numel()} tokens ({len(meta) + sizes[0]} bytes) exceeds the channel's "
                f"{self.req.slot_bytes}-byte slots (server max_tokens_per_request {self.info.max_tokens_per_request})"
            )
        wait = _Wait()
        while not self.req.free():
            self._check_server()
            if time.monotonic() > deadline:
                raise P.TeacherTimeoutError(f"teacher server {self.name!r} takes no requests (ring full)")
            wait()
        self._slot_seqs[self.req.written() + 1] = seq
        while len(self._slot_seqs) > _SLOTS_REMEMBERED:
            self._slot_seqs.popitem(last=False)
        self.req.put(meta, [tokens])
        self._shapes[seq] = tuple(tokens.shape)

    def receive(self, deadline: float):
        """(seq, payload or None, error or None) of the next reply; None when the deadline passes first."""
        wait = _Wait()
        while True:
            item = self.rep.take(lambda header, _, data: self._parse(header, data))
            if item is not None:
                self._shapes.pop(item[0], None)
                return item
            self._check_server()
            if time.monotonic() >= deadline:
                return None
            wait()

    def _parse(self, header: dict, data: torch.Tensor):
        if header.get("seq") is None and isinstance(header.get("slot"), int):
            # An error reply to a request frame the server could not read: it names the frame by ring slot.
            seq = self._slot_seqs.get(header["slot"], -1)
            return seq, None, str(header.get("error"))
        seq = P.reply_seq(header)
        shape = self._shapes.get(seq)  # not popped here: a slot rewritten while read is parsed again
        if header.get("status") != "ok":
            return seq, None, str(header.get("error"))
        ph = P.check_payload_header(header, shape if shape is not None else _claimed_shape(header), self.info)
        nv, ni, nl = ph.buffer_sizes()
        if header["buffers"] != [ni, nl, nv]:
            raise P.ProtocolError(f"reply buffers of {header['buffers']} bytes, its payload header implies "
                                  f"[{ni}, {nl}, {nv}] (indices, lse, values)")
        if shape is None:  # a reply to a request of an earlier attachment: nobody reads the data
            return seq, None, None
        buf = self._buffers.take(ni + nl + nv)  # lent until the payload's views are gone (reused: no page faults)
        buf.copy_(data)  # the one copy out of the slot, straight to the payload's device
        return seq, P.unpack_payload(buf, ph), None

    def close(self) -> None:
        if self._server is not None:
            _close_map(self._server[0])
            self._server = None
        _remove_if_unlocked(server_path(self.name, self.student % self.info.replicas) if hasattr(self, "info")
                            else server_path(self.name, 0))
        if self.mm is not None:
            _release_rings(self.req, self.rep)
            _close_map(self.mm)
            self.mm = None
            self.path.unlink(missing_ok=True)


def _release_rings(*rings: _Ring) -> None:
    """Drop the rings' views of a mapping, so that it can be closed."""
    for ring in rings:
        ring.raw = None
        try:
            ring.view.release()
        except BufferError:
            pass


def _close_map(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a payload view still points into it; the mapping goes with the last view
        pass


def _remove_if_unlocked(path: Path) -> None:
    """Remove a server segment that no live server holds (its server was killed: nothing else removes it until a
    server of that name starts again). A live server keeps a shared flock on its segment."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        if os.fstat(fd).st_uid != os.getuid():
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # held: a live (or frozen) server
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            log.info("removing %s: its teacher server is gone", path.name)
            path.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        os.close(fd)


def channel_owner_pid(path: Path) -> Optional[int]:
    """The pid that made a channel file or a half-made segment of ours (from its name), None for other files."""
    match = _OWNED_NAME_RE.search(path.name)
    if match is None:
        return None
    try:
        if os.stat(path).st_uid != os.getuid():
            return None
    except OSError:
        return None
    return int(match.group(1) or match.group(2))


def _claimed_shape(header: dict) -> tuple:
    """The shape a stale reply claims (for a request this student no longer tracks): still bounded by the
    handshake through check_payload_header, and the slot bounds the bytes."""
    ph = header.get("payload") or {}
    return ph.get("batch"), ph.get("seq_len")
