"""End to end: `kd-teacher serve` processes (a real Megatron-Core teacher) and two student ranks (a real gloo
world of their own, with Megatron's parallel state), over torch.distributed and over /dev/shm.

- every payload equals the in-process TeacherEngine.score of the same layout, bit for bit
  (torch.distributed: teacher TP=2 for students TP=1, teacher DP=2 replicas for students TP=2;
   shm: teacher TP=1 for students TP=2)
- a frozen teacher (SIGSTOP) and a killed one (SIGKILL) make every waiting student raise
  TeacherUnavailableError within timeout + 10%; a restarted shm teacher is reconnected without restarting
  the students
- 1000 requests of random lengths from two students: none lost, none duplicated, all matched by hash
- bad requests get error replies and the server goes on (both transports); over torch.distributed, a request
  far over the server's limit is refused before it is sent, and a reply that comes after its request timed
  out is discarded while the requests after it get their own payloads
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from kd_teacher.payload import token_hashes
from kd_teacher.runtime import free_port
from kd_teacher.testing.distributed import run_distributed
from kd_teacher.transport import IncompatibleTeacherError, RemoteTeacher, RemoteTeacherConfig
from kd_teacher.transport import protocol as P

ROOT = Path(__file__).resolve().parents[2]
# A dead or frozen teacher is detected by its heartbeat (HEARTBEAT_S), well inside TIMEOUT_S; TIMEOUT_S itself
# bounds every ordinary request, so it leaves room for a CPU teacher sharing 2 loaded cores with its students
# (at 3 s one of the 1000 requests timed out under a full CI run).
TIMEOUT_S, HEARTBEAT_S = 10.0, 1.5
_CLIENT: dict = {}  # the RemoteTeacher of a student worker, kept across run_distributed jobs


# ---- launching teachers -----------------------------------------------------------------------------------------
def start_teacher(transport: str, nprocs: int, overrides: list[str], log: Path) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "kd_teacher.cli", "serve", str(ROOT / f"configs/serve_{transport}.yaml"),
               "engine.repacking=off",
               "serve.heartbeat_interval_s=0.05", "serve.poll_interval_s=0.2", *overrides]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(f"{log}.{rank}", "w"),
                                      stderr=subprocess.STDOUT))
    return procs


def stop_teacher(procs):
    """SIGTERM (the server closes and removes its segments), SIGKILL if that does not end it."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)


def signal_later(procs, sig, delay_s: float, then=None):
    def fire():
        time.sleep(delay_s)
        for p in procs:
            p.send_signal(sig)
        if then is not None:
            then()

    t = threading.Thread(target=fire, daemon=True)
    t.start()
    return t


def batches(seed: int, n: int, max_len: int = 24, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (batch, int(torch.randint(2, max_len + 1, (1,), generator=g))), generator=g)
            for _ in range(n)]


# ---- functions the student / reference ranks run --------------------------------------------------------------
def _reference(tp: int, seed: int, n: int) -> list:
    """In-process TeacherEngine.score of each batch, with the teacher's layout (rank 0's answer)."""
    from kd_teacher.engine.loading import build_engine, load_teacher_config

    cfg = load_teacher_config(ROOT / "configs/teacher_tiny.yaml", [f"model.tensor_model_parallel_size={tp}"])
    engine = build_engine(cfg)
    return [_tensors(engine.score(t)) for t in batches(seed, n)]


def _tensors(p):
    return p.values.clone(), p.indices.clone(), p.lse.clone(), list(p.header.token_hashes)


def _connect(**kw) -> dict:
    cfg = RemoteTeacherConfig(timeout_s=TIMEOUT_S, heartbeat_timeout_s=HEARTBEAT_S, connect_timeout_s=120,
                              k=16, vocab_size=1000, **kw)
    _CLIENT["rt"] = RemoteTeacher(cfg)
    return {"replica": getattr(_CLIENT["rt"].channel, "replica", 0)}


def _score_batches(seed: int, n: int) -> list:
    """Every student scores the same batches (submitting ahead, up to max_in_flight)."""
    rt = _CLIENT["rt"]
    handles = [rt.submit(t, sample_ids=[100 * i, 100 * i + 1]) for i, t in enumerate(batches(seed, n))]
    return [_tensors(rt.result(h)) for h in handles]


def _score_until_failure(limit_s: float = 60.0) -> dict:
    """Score until the teacher fails us; report the error and how long the failing call waited."""
    rt = _CLIENT["rt"]
    tokens = batches(7, 1)[0]
    end = time.monotonic() + limit_s
    served = 0
    while time.monotonic() < end:
        start = time.monotonic()
        try:
            rt.score(tokens)
            served += 1
        except P.TransportError as e:
            return {"error": type(e).__name__, "waited": time.monotonic() - start, "served": served,
                    "unavailable": isinstance(e, P.TeacherUnavailableError)}
    return {"error": None, "served": served}


def _score_until_success(limit_s: float = 90.0) -> dict:
    """After a teacher restart: keep asking until a payload comes back (the same client, not reconnected)."""
    rt = _CLIENT["rt"]
    tokens = batches(8, 1)[0]
    end = time.monotonic() + limit_s
    errors = 0
    while time.monotonic() < end:
        try:
            payload = rt.score(tokens, sample_ids=[1, 2])
            return {"ok": payload.header.token_hashes == token_hashes(tokens), "errors": errors}
        except P.TeacherUnavailableError:
            errors += 1
    return {"ok": False, "errors": errors}


def _many_requests(n: int, seed: int) -> dict:
    """n requests of random shapes, unique sample ids; the hashes each reply carries, per sample id."""
    import torch.distributed as dist

    rt = _CLIENT["rt"]
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(seed + rank)
    sent, got, handles = {}, {}, []
    for i in range(n):
        b, s = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 65, (1,), generator=g))
        tokens = torch.randint(0, 1000, (b, s), generator=g)
        ids = [(rank * n + i) * 4 + j for j in range(b)]
        sent.update(zip(ids, token_hashes(tokens)))
        handles.append(rt.submit(tokens, ids))
        if len(handles) >= 3:
            p = rt.result(handles.pop(0))
            for sid, h in zip(p.header.sample_ids, p.header.token_hashes):
                got.setdefault(sid, []).append(h)
    for h in handles:
        p = rt.result(h)
        for sid, hh in zip(p.header.sample_ids, p.header.token_hashes):
            got.setdefault(sid, []).append(hh)
    return {"sent": sent, "got": got}


def _bad_requests() -> list:
    rt = _CLIENT["rt"]
    out = []
    for tokens in (torch.tensor([[3, 1000]]), torch.zeros(1, 129, dtype=torch.long)):
        try:
            rt.score(tokens)
            out.append(None)
        except P.RequestRejectedError as e:
            out.append(str(e))
    return out


def _far_too_large_is_not_sent() -> str:
    """A request the server could not even take in is refused by the client, before anything is sent."""
    try:
        _CLIENT["rt"].submit(torch.zeros(64, 4096, dtype=torch.long))
    except P.RequestRejectedError as e:
        return str(e)
    return ""


def _stale_reply_discarded() -> dict:
    """A request given up at once (timeout 0) leaves its receive posted: the late reply lands there and is
    discarded by sequence number, and the requests after it get their own payloads."""
    rt = _CLIENT["rt"]
    tokens = batches(9, 3)
    stale = rt.submit(tokens[0])
    try:
        rt.result(stale, timeout=0.0)
        timed_out = False
    except P.TeacherTimeoutError:
        timed_out = True
    fresh = [rt.score(t) for t in tokens[1:]]
    return {"timed_out": timed_out, "discarded": rt.stale_discarded,
            "matched": [p.header.token_hashes == token_hashes(t) for p, t in zip(fresh, tokens[1:])]}


def _heartbeat_store_reads(seconds: float) -> int:
    """KD-store operations a waiting student makes in `seconds` (review 23.6: it was 50 a second each)."""
    channel = _CLIENT["rt"].channel
    store, reads = channel.store, []

    class Counting:  # the real store, with its heartbeat reads counted
        def add(self, key, value):
            reads.append(key)
            return store.add(key, value)

    channel.store = Counting()
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            channel._check_teacher()
            time.sleep(0.005)
    finally:
        channel.store = store
    return len(reads)


def _close() -> bool:
    rt = _CLIENT.pop("rt", None)
    if rt is not None:
        rt.close()
    return True


# ---- checks -----------------------------------------------------------------------------------------------------
def assert_bitwise(got: list, ref: list):
    assert len(got) == len(ref)
    for (v, i, lse, hashes), (rv, ri, rlse, rhashes) in zip(got, ref):
        assert torch.equal(v, rv) and torch.equal(i, ri) and torch.equal(lse, rlse)
        assert hashes == rhashes


def assert_failed_in_time(reports: list):
    for r in reports:
        assert r["error"] is not None and r["unavailable"], r
        assert r["waited"] <= TIMEOUT_S * 1.1, r


# ---- torch.distributed ------------------------------------------------------------------------------------------
def test_dist_teacher_tp2_students_tp1_bitwise_thousand_requests_bad_and_stale_then_killed_teacher_fails_in_time(
        tmp_path):
    address = f"127.0.0.1:{free_port()}"
    teacher = start_teacher("dist", 2, ["model.tensor_model_parallel_size=2", f"serve.address={address}"],
                            tmp_path / "teacher")
    try:
        ref = run_distributed(_reference, 2, 2, 11, 6, tp=2)[0]
        run_distributed(_connect, 2, tp=1, transport="dist", address=address)
        for got in run_distributed(_score_batches, 2, 11, 6, tp=1):
            assert_bitwise(got, ref)
        # ... sent from the reply buffers the engine wrote its payloads into (DistServer.payload_views)
        assert "no copy" in (tmp_path / "teacher.0").read_text()
        assert_all_matched(run_distributed(_many_requests, 2, 500, 5, tp=1))
        for reasons in run_distributed(_bad_requests, 2, tp=1):  # error replies; the server goes on
            assert "out of range" in reasons[0] and "exceeds the teacher's maximum" in reasons[1]
        assert all("not sent" in r for r in run_distributed(_far_too_large_is_not_sent, 2, tp=1))
        for r in run_distributed(_stale_reply_discarded, 2, tp=1):
            assert r == {"timed_out": True, "discarded": 1, "matched": [True, True]}, r
        # A tenth of HEARTBEAT_S between reads: about 7 in a second, not the 50 a fixed 20 ms made.
        assert all(n <= 8 for n in run_distributed(_heartbeat_store_reads, 2, 1.0, tp=1))
        signal_later(teacher[:1], signal.SIGKILL, 1.0)
        assert_failed_in_time(run_distributed(_score_until_failure, 2, tp=1))
    finally:
        stop_teacher(teacher)
        run_distributed(_close, 2)


def assert_all_matched(results: list):
    """1000 requests of random lengths from two students: none lost, none duplicated, every hash matches."""
    sent = {k: v for r in results for k, v in r["sent"].items()}
    got: dict = {}
    for r in results:
        for sid, hashes in r["got"].items():
            got.setdefault(sid, []).extend(hashes)
    assert len(sent) >= 1000 and set(got) == set(sent) and all(len(h) == 1 for h in got.values())
    assert all(got[sid] == [sent[sid]] for sid in sent)


# ---- shared memory ----------------------------------------------------------------------------------------------
def test_shm_teacher_replicas_bitwise_bad_requests_frozen_killed_and_restarted(tmp_path):
    name = f"test-{uuid.uuid4().hex[:8]}"
    teacher = start_teacher("shm", 2, [f"serve.name={name}"], tmp_path / "teacher")  # 2 DP replicas, TP=1
    restarted: list = []

    def kill_and_restart():
        for p in teacher:
            p.kill()  # SIGKILL: no clean-up, its segments stay behind for the new server to take over
            p.wait()
        restarted.extend(start_teacher("shm", 2, [f"serve.name={name}"], tmp_path / "restarted"))

    try:
        ref = run_distributed(_reference, 2, 1, 13, 5, tp=1)[0]
        replicas = run_distributed(_connect, 2, tp=2, transport="shm", name=name)
        assert [r["replica"] for r in replicas] == [0, 1]
        for got in run_distributed(_score_batches, 2, 13, 5, tp=2):
            assert_bitwise(got, ref)

        # bad requests get error replies and the server goes on serving; a student of another k is refused
        for reasons in run_distributed(_bad_requests, 2, tp=2):
            assert "out of range" in reasons[0] and "exceeds the teacher's maximum" in reasons[1]
        with pytest.raises(IncompatibleTeacherError, match="k: the student expects 8"):
            RemoteTeacher(RemoteTeacherConfig(transport="shm", name=name, k=8, connect_timeout_s=30,
                                              student_rank=0, num_students=1))

        # freeze it mid-run: every waiting student fails in time; kill and restart it: the same students go on
        signal_later(teacher, signal.SIGSTOP, 1.0)
        assert_failed_in_time(run_distributed(_score_until_failure, 2, tp=2))
        kill_and_restart()
        for r in run_distributed(_score_until_success, 2, tp=2):
            assert r["ok"], r
    finally:
        run_distributed(_close, 2)
        stop_teacher(teacher)
        stop_teacher(restarted)
        for path in Path("/dev/shm").glob(f"kdt-{name}.*"):  # segments of the teacher killed on purpose
            path.unlink()
