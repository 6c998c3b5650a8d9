"""torch.distributed (gloo) students of a `DistServer`, each a process of its own (`replay_student`).

- A frozen student stalls nobody: the server answers with 8 MB payloads; student 0 is stopped (SIGSTOP) once
  it took a reply in, so the replies to its requests still in flight fill its socket and block its sending
  thread. Student 1, started only then, joins and finishes all its requests while student 0 is stopped (with
  one sending thread for all students, its replies queued behind the blocked send until the student timeout);
  let go on, student 0 finishes all of its own. The server there is the transport alone (no engine): it
  answers each request with a payload of the request's shape that carries the request's token hashes, which
  the student checks.
- Two teacher replicas (`kd-teacher serve`, two processes): each serves its students, and both end by
  themselves once all have left; replica 0, which hosts the KD store, last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kd_teacher.runtime import free_port
from kd_teacher.testing.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
K, VOCAB, SEQ, BATCH = 512, 32000, 512, 4  # a reply: 4 x 512 x 512 x 8 bytes = 8 MB, more than a loopback socket holds
FROZEN, RUNNING = 10, 40  # requests of student 0 (stopped after its first reply) and of student 1


def _student(address: str, rank: int, requests: int, out: Path, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kd_teacher.testing.replay_student", "--transport", "dist", "--address", address,
           "--rank", str(rank), "--num-students", "2", "--requests", str(requests), "--seed", "5", "--k", str(K),
           "--vocab-size", str(VOCAB), "--lengths", str(SEQ), "--min-batch", str(BATCH), "--max-batch", str(BATCH),
           "--max-in-flight", "4", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{out}.log", "w"))


def _echo(server, item, payloads: dict) -> None:
    from kd_teacher.payload import PayloadHeader, TopKPayload, token_hashes
    from kd_teacher.transport.protocol import Request

    if not isinstance(item, Request):
        server.reply(item[0], item[1], error=item[2])
        return
    b, s = item.tokens.shape
    if (b, s) not in payloads:
        payloads[(b, s)] = (torch.zeros(b, s, K), torch.zeros(b, s, K, dtype=torch.int32), torch.zeros(b, s))
    header = PayloadHeader(k=K, temperature=1.0, vocab_size=VOCAB, batch=b, seq_len=s, values_dtype="float32",
                           teacher_fingerprint="echo", recipe_fingerprint="echo",
                           token_hashes=token_hashes(item.tokens), sample_ids=item.sample_ids)
    server.reply(item.student, item.seq, TopKPayload(*payloads[(b, s)], header))


def _serve_a_frozen_and_a_running_student(workdir: str) -> dict:
    from kd_teacher.transport.dist_server import DistServer
    from kd_teacher.transport.protocol import ServerInfo

    workdir = Path(workdir)
    info = ServerInfo(vocab_size=VOCAB, k=K, temperature=1.0, values_dtype="float32", teacher_fingerprint="echo",
                      recipe_fingerprint="echo", max_tokens_per_request=BATCH * SEQ, max_seq_len=SEQ)
    address = f"127.0.0.1:{free_port()}"
    server = DistServer(address, info, backend="gloo", heartbeat_interval_s=0.05, student_timeout_s=120)
    progress = workdir / "progress0"
    frozen = _student(address, 0, FROZEN, workdir / "s0.pt", "--progress", str(progress))
    running = None
    report: dict = {"stopped": False, "frozen_sends_blocked": 0}
    payloads: dict = {}
    end = time.monotonic() + 200
    try:
        while not server.finished() and time.monotonic() < end:
            for item in server.poll(0.02):
                _echo(server, item, payloads)
            if not report["stopped"] and progress.exists() and int(progress.read_text() or 0) >= 1:
                frozen.send_signal(signal.SIGSTOP)
                report.update(stopped=True, stopped_at=time.monotonic())
                # student 1 joins only now: all its requests are served while student 0's replies are stuck
                running = _student(address, 1, RUNNING, workdir / "s1.pt")
            if report["stopped"] and "running_done_after_s" not in report:
                # replies to student 0 handed to its sending thread and not out: its socket is full
                blocked = sum(1 for p in server._pairs.values() if p.rank == 0 for _, job in p.sends if not job.done())
                report["frozen_sends_blocked"] = max(report["frozen_sends_blocked"], blocked)
                if running.poll() is not None:  # student 1 is done while student 0 is still stopped
                    report["running_done_after_s"] = time.monotonic() - report["stopped_at"]
                    report["progress_while_stopped"] = int(progress.read_text() or 0)
                    frozen.send_signal(signal.SIGCONT)
        report["finished"] = server.finished()
    finally:
        server.close()
        for p in (frozen, running):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    report["frozen_code"], report["running_code"] = frozen.returncode, getattr(running, "returncode", None)
    report["replies"] = [len(torch.load(workdir / f"s{r}.pt")["results"]) if (workdir / f"s{r}.pt").exists()
                         else None for r in (0, 1)]
    return report


def test_gloo_a_frozen_student_blocks_only_its_own_replies(tmp_path):
    report, = run_distributed(_serve_a_frozen_and_a_running_student, 1, str(tmp_path), timeout=300)
    assert report["stopped"] and report["running_code"] == 0, report
    # while student 0 was stopped, not after its student_timeout_s (120 s) dropped it: nothing waited for it
    assert report.get("running_done_after_s", float("inf")) < 60, report
    # the test did freeze a send: student 0's replies filled its socket and wait in its own sending thread
    assert report["frozen_sends_blocked"] >= 1, report
    assert report["progress_while_stopped"] < FROZEN, report
    # ... and once let go on, it took them in and finished; the server ended by itself
    assert report["frozen_code"] == 0 and report["replies"] == [FROZEN, RUNNING] and report["finished"], report


def test_gloo_two_teacher_replicas_each_serve_their_students_and_end_when_all_left(tmp_path):
    """`kd-teacher serve` with two data-parallel replicas (two processes, replica 0 hosting the KD store) and three
    students: replica 0 serves students 0 and 2, replica 1 student 1. Every student finishes; then both replicas
    end by themselves (replica 0, the store's host, only once replica 1 is done too)."""
    port, master = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    teachers = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master), PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "kd_teacher.cli", "serve", str(ROOT / "configs/serve_dist.yaml"),
               f"serve.address={address}", "serve.backend=gloo", "serve.poll_interval_s=0.1"]
        teachers.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(tmp_path / f"teacher{rank}.log", "w"),
                                         stderr=subprocess.STDOUT))
    students = []
    try:
        for rank in range(3):
            cmd = [sys.executable, "-m", "kd_teacher.testing.replay_student", "--transport", "dist", "--address",
                   address, "--rank", str(rank), "--num-students", "3", "--requests", "30", "--seed", "2",
                   "--out", str(tmp_path / f"s{rank}.pt")]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            students.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                             stderr=open(tmp_path / f"s{rank}.log", "w")))
        assert [p.wait(timeout=180) for p in students] == [0, 0, 0]
        assert [len(torch.load(tmp_path / f"s{r}.pt")["results"]) for r in range(3)] == [30, 30, 30]
        assert [p.wait(timeout=60) for p in teachers] == [0, 0]  # ended by themselves
    finally:
        for p in students + teachers:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [(tmp_path / f"teacher{r}.log").read_text() for r in range(2)]
    assert "student 0 joined" in logs[0] and "student 2 joined" in logs[0] and "student 1 joined" in logs[1]
