"""One `kd-teacher serve` teacher, many students: each student a process of its own
(`kd_teacher.testing.replay_student`), the server (a real Megatron-Core teacher) in a worker process.

- shm, 4 students, repacking into proven shapes (a table measured here by benchmarks/batch_invariance.py):
  every reply matched to its request by sample id and hash, none lost or duplicated, every payload bit for bit
  the one `TeacherEngine.score` gives the request alone; rows of different students shared forwards. One
  student is killed mid-stream: the others finish all their requests, and the same student restarted goes on
  to finish all of its own. Another is stopped (SIGSTOP) mid-stream: the others finish while it is stopped.
- torch.distributed (gloo), 4 students, repacking off: the same checks against the as-given runs; one student
  joins the running server after it has served others, one is killed mid-stream and restarted (same rank).
- fairness: one student floods, one sends a request at a time; the second's p99 wait is at most one round (one
  `engine.score_many`) beyond the first round formed after its request arrived, a bound in rounds (forwards),
  not seconds, so a loaded machine cannot make it flake.

The issue's 4 students x 250 requests (~25 s of the suite on 2 cores; KDT_SERVE_REQUESTS=60 for a quicker run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kd_teacher.runtime import free_port
from kd_teacher.serve_batching import percentile
from kd_teacher.testing.distributed import run_distributed
from kd_teacher.testing.replay_student import micro_batches

ROOT = Path(__file__).resolve().parents[2]
STUDENTS = 4
REQUESTS = int(os.environ.get("KDT_SERVE_REQUESTS", "250"))
LENGTHS = "8,16"


def _student(transport: str, where: str, rank: int, num: int, out: Path, *extra) -> subprocess.Popen:
    where_flag = "--name" if transport == "shm" else "--address"
    cmd = [sys.executable, "-m", "kd_teacher.testing.replay_student", "--transport", transport, where_flag, where,
           "--rank", str(rank), "--num-students", str(num), "--seed", "3", "--lengths", LENGTHS, "--keep",
           "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(f"{out}.log", "w"))


def _wait(procs: list, timeout_s: float) -> list:
    end = time.monotonic() + timeout_s
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(end - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def _progress(args: list) -> int:
    path = Path(args[args.index("--progress") + 1])
    return int(path.read_text() or 0) if path.exists() else 0


def _when(procs: dict, students: list, rank: int, after: int) -> None:
    """Until student `rank` took `after` replies in (its --progress file says) or ended."""
    end = time.monotonic() + 120
    while time.monotonic() < end and procs[rank].poll() is None and _progress(students[rank]) < after:
        time.sleep(0.01)


def _serve_students(transport: str, overrides: list, students: list, workdir: str, kill: dict | None = None,
                    freeze: dict | None = None, join: dict | None = None):
    """The server in a thread of this worker, the students as processes; then the reference payloads of every
    request with this teacher alone (`TeacherEngine.score`, as given). `students`: per rank, extra arguments of
    its replay_student. `kill`: {"rank", "after"[, "restart"]}: that student is SIGKILLed once it took `after`
    replies in, and started again (same rank) with its requests from the first. `freeze`: {"rank", "after"}:
    that student is SIGSTOPped once it took `after` replies in, and let go on (SIGCONT) only once all the others
    have finished. `join`: {"rank", "after_rank", "after"}: that student is started only once student
    `after_rank` took `after` replies in (it joins a server that is already serving the others)."""
    from kd_teacher.engine.loading import build_engine
    from kd_teacher.serve import load_serve_config, serve

    workdir = Path(workdir)
    where = f"many-{uuid.uuid4().hex[:8]}" if transport == "shm" else f"127.0.0.1:{free_port()}"
    key = "serve.name" if transport == "shm" else "serve.address"
    cfg = load_serve_config(ROOT / f"configs/serve_{transport}.yaml", [f"{key}={where}", "serve.status_interval_s=1",
                                                                       "serve.poll_interval_s=0.1", *overrides])
    stop, box = threading.Event(), {}

    def run():
        try:
            box["stats"] = serve(cfg, stop)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            box["error"] = f"{type(e).__name__}: {e}"

    num = len(students)
    late = join["rank"] if join is not None else None
    procs = {r: _student(transport, where, r, num, workdir / f"s{r}.pt", *args) for r, args in enumerate(students)
             if r != late}
    server = threading.Thread(target=run, daemon=True)
    server.start()
    frozen, joined = None, {}
    if join is not None:
        _when(procs, students, join["after_rank"], join["after"])
        joined["served_before_join"] = _progress(students[join["after_rank"]])
        procs[late] = _student(transport, where, late, num, workdir / f"s{late}.pt", *students[late])
    if freeze is not None:
        _when(procs, students, freeze["rank"], freeze["after"])
        frozen = procs.pop(freeze["rank"])
        frozen.send_signal(signal.SIGSTOP)
    if kill is not None:
        _when(procs, students, kill["rank"], kill["after"])
        victim = procs.pop(kill["rank"])
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        if kill.get("restart", True):
            procs[kill["rank"]] = _student(transport, where, kill["rank"], num, workdir / f"s{kill['rank']}.pt",
                                           *students[kill["rank"]])
    codes = _wait(list(procs.values()), 240)
    if frozen is not None:
        # the others are done while it was stopped; let it go on and finish
        summary_frozen = dict(progress_while_frozen=_progress(students[freeze["rank"]]))
        frozen.send_signal(signal.SIGCONT)
        codes += _wait([frozen], 240)
    if transport == "shm":
        stop.set()
    server.join(timeout=60)
    stop.set()
    stats = box.get("stats")
    summary = dict(codes=codes, error=box.get("error"), **joined)
    if frozen is not None:
        summary.update(summary_frozen)
    if stats is not None:
        summary.update(requests=stats.requests, rounds=stats.batches, forwards=stats.forwards, dropped=stats.dropped,
                       latency={r: (list(v.rounds), list(v.seconds)) for r, v in stats.latency.items()})
    engine = build_engine(replace(cfg.teacher(), engine=replace(cfg.engine, repacking="off", invariance_table=None)))
    summary["checks"] = {r: _check(engine, r, workdir / f"s{r}.pt", students[r]) for r in range(num)}
    return summary


def _check(engine, rank: int, path: Path, args: list) -> dict:
    """Every request of student `rank` answered once, by its own sample ids and hashes, and bit for bit the
    payload TeacherEngine.score gives it alone."""
    from kd_teacher.payload import token_hashes
    from kd_teacher.testing.replay_student import sample_ids

    if not path.exists():
        return dict(missing="no result file")
    n = int(args[args.index("--requests") + 1]) if "--requests" in args else 60
    max_batch = int(args[args.index("--max-batch") + 1]) if "--max-batch" in args else 2
    lengths = [int(x) for x in (args[args.index("--lengths") + 1] if "--lengths" in args else LENGTHS).split(",")]
    batches = micro_batches(3, rank, n, lengths, max_batch)
    got = torch.load(path)["results"]
    matched = bitwise = 0
    for i, tokens in enumerate(batches):
        r = got.get(i)
        if r is None or r["sample_ids"] != sample_ids(rank, i, tokens.shape[0]) or r["hashes"] != token_hashes(tokens):
            continue
        matched += 1
        alone = engine.score(tokens)
        bitwise += bool(torch.equal(alone.values, r["values"]) and torch.equal(alone.indices, r["indices"])
                        and torch.equal(alone.lse, r["lse"]))
    return dict(requests=n, replies=len(got), matched=matched, bitwise=bitwise)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    """This machine's batch-invariance table for the served tiny model (rows of 8 and 16 tokens)."""
    out = tmp_path_factory.mktemp("bi") / "table.json"
    subprocess.run([sys.executable, "benchmarks/batch_invariance.py", "--config", "configs/serve_shm.yaml",
                    "--seq-lens", "8,16", "--tokens", "16,32,64", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out


def _assert_all_answered(summary: dict, students: int):
    assert summary["error"] is None and all(c == 0 for c in summary["codes"]), summary
    for rank in students:
        check = summary["checks"][rank]
        assert check["replies"] == check["requests"] == REQUESTS, (rank, check)  # none lost, none extra
        assert check["matched"] == REQUESTS and check["bitwise"] == REQUESTS, (rank, check)


def test_shm_students_share_forwards_in_proven_shapes_bitwise_and_a_killed_student_restarts(tmp_path, table):
    students = [["--requests", str(REQUESTS), "--max-in-flight", "4"] for _ in range(STUDENTS)]
    for rank in (1, STUDENTS - 1):
        students[rank] += ["--progress", str(tmp_path / f"progress{rank}")]
    summary, = run_distributed(_serve_students, 1, "shm",
                               [f"engine.invariance_table={table}", "engine.max_tokens_per_batch=64",
                                "serve.max_wait_ms=5"], students, str(tmp_path),
                               kill=dict(rank=STUDENTS - 1, after=REQUESTS // 4),
                               freeze=dict(rank=1, after=REQUESTS // 6), timeout=400)
    _assert_all_answered(summary, range(STUDENTS))
    # Student 1 was stopped (SIGSTOP) a sixth of the way through until the others had finished all theirs: a
    # student that takes no replies in stalls nobody, and once let go on it finished all of its own.
    assert summary["progress_while_frozen"] < REQUESTS, summary
    # The killed student's requests that were in flight never came back to it; its restart sent all again.
    assert summary["requests"] >= STUDENTS * REQUESTS
    # Rows of several requests shared forwards: fewer forwards than requests scored.
    assert summary["forwards"] < summary["requests"], summary


def test_gloo_students_join_a_running_server_and_a_killed_student_restarts_bitwise(tmp_path):
    """torch.distributed: student 2 joins once the server has served others, student 3 is SIGKILLed a quarter of
    the way through and started again with the same rank, student 1 is stopped (SIGSTOP) a sixth of the way
    through until the others have finished; every student finishes all its requests, each reply matched by
    sample id and hash, none lost or duplicated, every payload bit for bit the as-given run."""
    students = [["--requests", str(REQUESTS), "--max-in-flight", "4"] for _ in range(STUDENTS)]
    for rank in (0, 1, STUDENTS - 1):
        students[rank] += ["--progress", str(tmp_path / f"progress{rank}")]
    summary, = run_distributed(_serve_students, 1, "dist", ["serve.backend=gloo", "serve.connect_timeout_s=120",
                                                           "serve.max_wait_ms=5"], students, str(tmp_path),
                               kill=dict(rank=STUDENTS - 1, after=REQUESTS // 4),
                               freeze=dict(rank=1, after=REQUESTS // 6),
                               join=dict(rank=2, after_rank=0, after=REQUESTS // 5), timeout=400)
    _assert_all_answered(summary, range(STUDENTS))
    # the others (the killed one's restart too) finished while student 1 was stopped, which then finished its own
    assert summary["progress_while_frozen"] < REQUESTS, summary
    # student 2 joined a server that had already answered others' requests
    assert summary["served_before_join"] >= REQUESTS // 5, summary
    # The killed student's requests that were in flight never came back to it; its restart sent all again.
    assert summary["requests"] >= STUDENTS * REQUESTS, summary
    # repacking off (the default): one forward per request scored (a killed student's queued requests are dropped
    # unscored), while rounds still gather several students' requests
    assert summary["forwards"] == summary["requests"] - summary["dropped"], summary
    assert summary["rounds"] < summary["requests"], summary


def test_a_flooding_student_does_not_starve_one_that_sends_one_at_a_time(tmp_path):
    # Rounds of 64 tokens hold four [1, 16] requests; the flooder keeps 8 in flight on the server.
    flood = ["--requests", "120", "--max-in-flight", "8", "--lengths", "16", "--max-batch", "1"]
    single = ["--requests", "25", "--mode", "single", "--lengths", "16", "--max-batch", "1"]
    summary, = run_distributed(_serve_students, 1, "shm",
                               ["engine.max_tokens_per_batch=64", "serve.max_in_flight_per_student=8",
                                "serve.max_wait_ms=5"], [flood, single], str(tmp_path), timeout=400)
    assert summary["error"] is None and summary["codes"] == [0, 0], summary
    assert summary["checks"][0]["matched"] == 120 and summary["checks"][1]["matched"] == 25
    flood_rounds, single_rounds = summary["latency"][0][0], summary["latency"][1][0]
    assert len(single_rounds) == 25
    # The stated bound: scored in the first round formed after it arrived, or at worst the one after.
    assert percentile(single_rounds, 99) <= 1, single_rounds
    # ... while the flooder's requests did queue behind each other (the test would prove nothing otherwise; how
    # often depends on how fast its process refills them on a loaded machine, that it happens does not)
    assert max(flood_rounds) >= 1, flood_rounds
