"""The teacher's end of the shared-memory transport (`shm` describes the files, rings and the student's end).

One `ShmServer` per teacher replica: it publishes the server segment, attaches every student channel that
appears under its name (students come and go: a restarted student's new channel is attached like any other;
a student whose process is gone is dropped), takes requests in, and writes replies.

Two threads use it: the serving loop polls (attaching, dropping and reading request rings happen only there)
and a reply thread writes replies (`reply`), each channel's reply ring and outbox under that channel's lock.
A student that takes no replies in (stopped, or far behind) only fills its own outbox: once the oldest reply
there has waited `student_timeout_s`, its queued replies are dropped and logged; the others never wait for it.

Frames come from other processes and are not trusted: a slot whose header is not JSON, is nested too deep,
has wrong types or a token buffer that disagrees with its shape is answered with an error reply (by its ring
slot number when the frame has no readable request seq: the student maps that back to its request), and a
channel file with a malformed hello is refused with a verdict naming the problem. Nothing a student writes
stops the server for the others.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import mmap
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from kd_teacher.payload import TopKPayload
from kd_teacher.transport import protocol as P
from kd_teacher.transport.shm import (
    _ATTACHED_GEN, _CHANNEL_MAGIC, _GEN, _HEARTBEAT, _HELLO_AT, _HELLO_LEN, _HELLO_MAX, _INFO_AT, _INFO_LEN, _PID,
    _RINGS_AT, _SERVER_BYTES, _SERVER_MAGIC, _VERDICT_AT, _VERDICT_LEN, _VERDICT_MAX, SHM_DIR, _check_name,
    _close_map, _create, _get, _get_json, _meta, _open_owned, _pid_alive, _put, _put_json, _release_rings, _rings,
    _Wait, channel_owner_pid, server_path,
)

log = logging.getLogger(__name__)

_SCAN_S = 0.05  # how often the poll loop looks for new and vanished channel files


class _Attached:
    """One attached student channel."""

    def __init__(self, cid: int, path: Path, mm: mmap.mmap, student: int, pid: int):
        self.cid, self.path, self.mm, self.student, self.pid = cid, path, mm, student, pid
        self.req, self.rep = _rings(mm)
        # Replies waiting for a free slot: (seq, slot, payload, error, queued at). A slow student fills only this.
        self.outbox: collections.deque = collections.deque()
        self.lock = threading.Lock()  # the reply ring and the outbox (the reply thread and the poll loop flush)
        self.gone: Optional[str] = None  # why the poll loop should drop it (found on the reply side)
        self.closed = False
        self.dropped_replies = 0

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.outbox.clear()
            _release_rings(self.req, self.rep)
            _close_map(self.mm)


class ShmServer:
    """The teacher replica's end: publishes the server segment, attaches student channels, moves messages."""

    def __init__(self, name: str, info: P.ServerInfo, replica: int = 0, heartbeat_interval_s: float = 0.05,
                 student_timeout_s: float = 60.0):
        self.name, self.info, self.replica = _check_name(name), info, replica
        self.student_timeout_s = student_timeout_s
        self.path = server_path(name, replica)
        self._claim_name()
        self._remove_stale_channels()
        self.generation = secrets.randbits(62) + 1
        mm, tmp = _create(self.path, _SERVER_BYTES)
        # Held for the server's life: a student that finds it unlocked knows the server is gone (`shm.ShmClient`
        # removes a dead server's segment on close()).
        self._lock_fd = os.open(tmp, os.O_RDONLY)
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        mm[0:8] = _SERVER_MAGIC
        _put(mm, _GEN, self.generation)
        _put(mm, _PID, os.getpid())
        _put_json(mm, _INFO_AT, _SERVER_BYTES - _INFO_AT, _INFO_LEN, json.loads(info.to_json()))
        os.rename(tmp, self.path)
        self.mm = mm
        self.channels: dict[int, _Attached] = {}
        self._seen: dict[Path, float] = {}
        self._next_id = 0
        self._next_first = 0  # poll starts at another channel each time: none is always served first
        self._last_scan = 0.0
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat_interval_s,), daemon=True)
        self._beat.start()
        log.info("shm teacher server %s replica %d up (generation %x)", name, replica, self.generation)

    def _claim_name(self) -> None:
        """Take the name over from a server that is dead or frozen (or from a file that is not a server segment);
        refuse it while a live server beats there."""
        if not self.path.exists():
            return
        try:
            mm, _ = _open_owned(self.path)
        except FileNotFoundError:
            return
        except (P.ProtocolError, OSError) as e:
            raise RuntimeError(f"cannot take over shared-memory name {self.path}: {e}") from e
        try:
            if len(mm) < _SERVER_BYTES or bytes(mm[0:8]) != _SERVER_MAGIC:
                log.warning("replacing %s, which is not a teacher server segment", self.path)
                return
            pid, beat = _get(mm, _PID), _get(mm, _HEARTBEAT)
            alive = _pid_alive(pid)
            if alive:
                time.sleep(0.5)  # a live server beats every heartbeat_interval_s; a dead or frozen one does not
                alive = _pid_alive(pid) and _get(mm, _HEARTBEAT) != beat
        finally:
            mm.close()
        if alive:
            raise RuntimeError(f"another teacher server (pid {pid}) serves {self.path}; stop it or pick another name")
        log.info("replacing the segment of a dead or frozen server (pid %d) at %s", pid, self.path)

    def _remove_stale_channels(self) -> None:
        """Channel files (and half-made files) of processes that are gone: left by students that were killed."""
        for path in SHM_DIR.glob(f"kdt-{self.name}.*"):
            pid = channel_owner_pid(path)
            if pid is not None and not _pid_alive(pid):
                log.info("removing %s, left by process %d which is gone", path.name, pid)
                path.unlink(missing_ok=True)

    def _heartbeat(self, interval: float) -> None:
        beat = 0
        while not self._stop.wait(interval):
            beat += 1
            _put(self.mm, _HEARTBEAT, beat)

    # ---- attaching students (the poll loop only) ---------------------------------------------------------------
    def _scan(self) -> None:
        for path in SHM_DIR.glob(f"kdt-{self.name}.c*"):
            if ".tmp-" in path.name or path in self._seen:
                continue
            self._seen[path] = time.monotonic()
            try:
                self._attach(path)
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the server for the others
                log.warning("ignoring shared-memory channel %s: %s: %s", path, type(e).__name__, e)
        for ch in list(self.channels.values()):
            if ch.gone is None and (not ch.path.exists() or not _pid_alive(ch.pid)):
                ch.gone = f"student {ch.student} (pid {ch.pid}) is gone"
                ch.path.unlink(missing_ok=True)
            if ch.gone is not None:
                log.info("dropping the channel of student %d: %s", ch.student, ch.gone)
                self.channels.pop(ch.cid, None)
                self._seen.pop(ch.path, None)
                ch.close()

    def _attach(self, path: Path) -> None:
        mm, _ = _open_owned(path)
        try:
            if len(mm) < _RINGS_AT or bytes(mm[0:8]) != _CHANNEL_MAGIC:
                raise P.ProtocolError("not a kd-teacher channel")
            try:
                student, pid, expect = _hello(_get_json(mm, _HELLO_AT, _HELLO_MAX, _HELLO_LEN))
            except P.ProtocolError as e:  # answered, so that whoever wrote it is not left waiting
                self._verdict(mm, [f"malformed hello: {e}"])
                raise
            if student % self.info.replicas != self.replica:
                return
            problems = P.incompatibilities(self.info, expect)
            self._verdict(mm, problems)
            if problems:
                log.warning("refused student %d: %s", student, "; ".join(problems))
                return
            self._next_id += 1
            self.channels[self._next_id] = _Attached(self._next_id, path, mm, student, pid)
            mm = None
            log.info("attached student %d (pid %d) via %s", student, pid, path.name)
        finally:
            if mm is not None:
                mm.close()

    def _verdict(self, mm: mmap.mmap, problems: list) -> None:
        _put_json(mm, _VERDICT_AT, _VERDICT_MAX, _VERDICT_LEN, {"ok": not problems, "reason": "; ".join(problems)})
        _put(mm, _ATTACHED_GEN, self.generation)

    # ---- the endpoint interface --------------------------------------------------------------------------------
    def poll(self, timeout: float, max_requests: int = 64,
             allowance: Optional[Callable[[int], int]] = None) -> list:
        """Requests (protocol.Request, `student` = channel id) and (channel id, seq, error text) triples, waiting
        up to `timeout` for the first. `allowance(channel id)`: how many more of that student's requests the
        caller takes now (the rest stay in its ring: backpressure on that student alone)."""
        deadline = time.monotonic() + timeout
        wait = _Wait(max_sleep_s=0.002)
        while True:
            now = time.monotonic()
            if now - self._last_scan > _SCAN_S:
                self._scan()
                self._last_scan = now
            out = []
            channels = list(self.channels.values())
            self._next_first += 1
            for i in range(len(channels)):
                ch = channels[(self._next_first + i) % len(channels)]
                self._flush(ch)
                room = min(max_requests - len(out), allowance(ch.cid) if allowance is not None else max_requests)
                for _ in range(max(room, 0)):
                    item = self._take(ch)
                    if item is None:
                        break
                    out.append(item)
            if out or time.monotonic() >= deadline:
                return out
            wait()

    def _take(self, ch: _Attached):
        """The next request of `ch` (or its error triple); None when its ring is empty. A frame that cannot be
        read as a request is answered here, by slot."""
        slot = ch.req.next_seq()
        try:
            return ch.req.take(lambda header, views, _: self._parse(ch.cid, header, views))
        except Exception as e:  # noqa: BLE001 - a corrupt or hostile frame: answered, and the server goes on
            log.warning("channel of student %d: request frame %d refused: %s: %s", ch.student, slot,
                        type(e).__name__, e)
            self._queue(ch, None, slot, None, f"request frame refused: {type(e).__name__}: {e}")
            return (ch.cid, -1, None)  # counted as rejected by the caller; the reply went out above

    def _parse(self, cid: int, header: dict, buffers: list):
        _, seq = P.request_header_ok(header)  # no seq: a ProtocolError, answered by slot
        try:
            req = P.decode_request(header, buffers, self.info)  # copies the token ids out of the slot
        except P.RequestRejectedError as e:
            return (cid, seq, str(e))
        req.student = cid
        return req

    def reply(self, student: int, seq: int, payload: Optional[TopKPayload] = None, error: Optional[str] = None) -> None:
        """Queue the reply to request `seq` of `student` (the channel id, which this server's Requests carry as
        their `student`) and write what fits now (any thread)."""
        ch = self.channels.get(student)
        if ch is None or seq < 0:
            return
        self._queue(ch, seq, None, payload, error)

    def _queue(self, ch: _Attached, seq: Optional[int], slot: Optional[int], payload, error) -> None:
        with ch.lock:
            if ch.closed:
                return
            ch.outbox.append((seq, slot, payload, error, time.monotonic()))
            self._flush_locked(ch)

    def _flush(self, ch: _Attached) -> None:
        with ch.lock:
            if not ch.closed:
                self._flush_locked(ch)

    def _flush_locked(self, ch: _Attached) -> None:
        while ch.outbox and ch.gone is None:
            if not ch.rep.free():
                waited = time.monotonic() - ch.outbox[0][4]
                if waited > self.student_timeout_s:
                    ch.dropped_replies += len(ch.outbox)
                    log.warning("student %d took no reply in for %.0f s: dropped %d replies to it", ch.student,
                                waited, len(ch.outbox))
                    ch.outbox.clear()
                return
            if _get(ch.mm, _ATTACHED_GEN) != self.generation:
                ch.gone = "it is attached to another server now"
                return
            seq, slot, payload, error = ch.outbox.popleft()[:4]
            if payload is None:
                meta, buffers = _meta(P.reply_header(seq, error=error, slot=slot), []), []
            else:
                # protocol.reply_header's fields; the payload header's dict as it is (its to_json() costs 20 us)
                header = {"type": "reply", "seq": seq, "status": "ok", "payload": vars(payload.header)}
                # indices, lse, values: each starts 4-byte aligned, so the student views one buffer as all three
                buffers = [payload.indices, payload.lse, payload.values]
                sizes = [t.numel() * t.element_size() for t in buffers]
                meta = _meta(header, sizes)
                if not ch.rep.fits(meta, sizes):  # cannot happen for requests within max_tokens_per_request
                    error = f"reply of {len(meta) + sum(sizes)} bytes does not fit the {ch.rep.slot_bytes}-byte slot"
                    meta, buffers = _meta(P.reply_header(seq, error=error), []), []
            ch.rep.put(meta, buffers)

    def flush(self) -> None:
        for ch in list(self.channels.values()):
            self._flush(ch)

    def payload_views(self, student: int, seq: int) -> None:
        return None  # a payload is copied into its reply slot once the slot is free

    def connected(self) -> dict:
        """Channel id -> student rank of the students attached now."""
        return {cid: ch.student for cid, ch in list(self.channels.items()) if ch.gone is None}

    def dropped_replies(self) -> int:
        return sum(ch.dropped_replies for ch in list(self.channels.values()))

    def finished(self) -> bool:
        return False

    def close(self) -> None:
        self._stop.set()
        self._beat.join(timeout=1)
        try:
            mm, _ = _open_owned(self.path)
            mine = _get(mm, _GEN) == self.generation
            mm.close()
            if mine:
                self.path.unlink()
        except (OSError, P.ProtocolError):
            pass
        os.close(self._lock_fd)
        for ch in self.channels.values():
            ch.close()
        self.channels.clear()


def _hello(hello) -> tuple:
    """(student rank, pid, expectation) of a channel's hello; ProtocolError naming what is wrong with it."""
    if not isinstance(hello, dict):
        raise P.ProtocolError(f"hello is a JSON {type(hello).__name__}, not an object")
    student, pid = hello.get("student"), hello.get("pid")
    for name, value in (("student", student), ("pid", pid)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise P.ProtocolError(f"hello field {name}={value!r:.80} is not a non-negative integer")
    return student, pid, P.student_expectation(hello)
