"""Streaming teacher: transport throughput against raw copies of the same bytes, and the student's step time
with a remote teacher against the CE-only step and the in-process (co-located) teacher step, same run.

    python benchmarks/stream.py --preset cpu                     # shm + gloo on this machine
    python benchmarks/stream.py --preset gpu --out $OUT/stream_gpu.json   # 2 GPUs: student GPU 0, teacher GPU 1

(a) throughput: payload-sized replies (preset tokens x k) from an echo endpoint in another process (the real
    ShmServer / DistServer, answering each request with a precomputed payload that carries the request's token
    hashes) to a RemoteTeacher with `max_in_flight` requests out, against, in the same run:
      dist - raw send/recv of one tensor of the same bytes over the same KD process group
      shm  - a raw copy of the same bytes into and out of a /dev/shm mapping (one process, no signalling)
    ratio = raw seconds / transport seconds (target >= 0.9). The echo stands in for TeacherEngine: it hashes
    each request's tokens and copies its payload into the endpoint's reply buffer (`payload_views`, as the
    engine stacks its payload there) on threads of its own, as the engine does that host work while its
    forward runs on the GPU. For dist the JSON also has the student's per-message costs and `student_floor`:
    the least host work per message, each step timed alone, and the ratio that floor allows.
(b) overlap: Megatron-Core training steps (benchmarks/kd_step.py's student, script and teacher) with the KD
    hook reading ahead from a `kd-teacher serve` process (shm on CPU, NCCL on GPU) against the CE-only step
    (target <= 1.05 when the teacher is fast enough) and against the in-process teacher step; timed
    interleaved, so drifting load hits all modes alike.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from timing import sync  # noqa: E402

PRESETS = {
    "cpu": dict(batch=2, seq=2048, k=64, vocab=8000, dtype="float32", messages=30, rounds=5, in_flight=8,
                transports=["shm", "dist"], step_transport="shm", teachers=["small", "large"], steps=6, warmup=2),
    # 2 GPUs, one call: throughput, then the overlap with the student-sized teacher alone (its forward is a
    # fraction of the student's step per micro-batch: "fast enough"; the JSON records both times).
    "gpu": dict(batch=2, seq=4096, k=64, vocab=128256, dtype="bfloat16", messages=50, rounds=5, in_flight=4,
                transports=["dist"], step_transport="dist", teachers=["small"], steps=10, warmup=3),
}


def _device(index: int = 0) -> torch.device:
    return torch.device("cuda", index) if torch.cuda.is_available() else torch.device("cpu")


def _info(p: dict):
    from kd_teacher.transport.protocol import ServerInfo

    return ServerInfo(vocab_size=p["vocab"], k=p["k"], temperature=1.0, values_dtype=p["dtype"],
                      teacher_fingerprint="bench", recipe_fingerprint="bench",
                      max_tokens_per_request=p["batch"] * p["seq"], max_seq_len=p["seq"])


def _payload_tensors(p: dict, device):
    g = torch.Generator().manual_seed(0)
    b, s, k = p["batch"], p["seq"], p["k"]
    values = torch.randn(b, s, k, generator=g).sort(-1, descending=True).values.to(getattr(torch, p["dtype"]))
    indices = torch.randint(0, p["vocab"], (b, s, k), generator=g, dtype=torch.int32)
    lse = torch.full((b, s), 20.0)
    return values.to(device), indices.to(device), lse.to(device)


# ---- (a) the echo endpoint (runs as its own process) ---------------------------------------------------------
def echo_server(transport: str, preset: str, where: str, stats_path: str = "") -> None:
    from dataclasses import replace

    from kd_teacher.payload import PayloadHeader, TopKPayload, token_hashes
    from kd_teacher.transport.client import _hash_threads
    from kd_teacher.transport.protocol import Request
    from kd_teacher.transport.dist_transport import TAG_REPLY

    p = PRESETS[preset]
    info = _info(p)
    device = _device(1 if torch.cuda.device_count() > 1 else 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    values, indices, lse = _payload_tensors(p, device)
    header = PayloadHeader(k=p["k"], temperature=1.0, vocab_size=p["vocab"], batch=p["batch"], seq_len=p["seq"],
                           values_dtype=p["dtype"], teacher_fingerprint="bench", recipe_fingerprint="bench")
    raw = torch.cat([t.reshape(-1).view(torch.uint8) for t in (values, indices, lse)])
    if transport == "shm":
        from kd_teacher.transport.shm_server import ShmServer

        server = ShmServer(where, info)
    else:
        from kd_teacher.transport.dist_server import DistServer

        server = DistServer(where, info, backend="nccl" if device.type == "cuda" else "gloo", device=device)
    import signal

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # leave through close(): segments removed
    reply_s, batch_sizes = [], []  # the serving thread's time per reply, requests per poll
    # The engine's stand-in. TeacherEngine.score hashes a request's tokens on the host while its forward runs on
    # the GPU, and stacks its payload into the reply buffer the endpoint offers (`payload_views`, serve.py);
    # here threads hash and copy the precomputed payload in while the serving thread replies to earlier
    # requests, in arrival order (on the serving thread itself where there are no cores to spare, as the
    # student's client does).
    threads = _hash_threads()
    engine = ThreadPoolExecutor(threads, thread_name_prefix="echo-engine") if threads else _Inline()
    waiting: collections.deque = collections.deque()  # (request, future of (token hashes, payload tensors))
    template = (values, indices, lse)
    payload_views = getattr(server, "payload_views", None)

    def score(item, into):
        hashes = token_hashes(item.tokens)
        if into is None:
            return hashes, template
        for dst, src in zip(into, template):
            dst.copy_(src)
        return hashes, into

    def answer_next():
        item, scored = waiting.popleft()
        hashes, tensors = scored.result()
        t0 = time.perf_counter()
        h = replace(header, token_hashes=hashes, sample_ids=item.sample_ids)
        server.reply(item.student, item.seq, TopKPayload(*tensors, h))
        reply_s.append(time.perf_counter() - t0)

    while not stop and (waiting or not server.finished()):
        items = server.poll(0.0 if waiting else 0.2)
        batch_sizes.append(len(items)) if items else None
        for item in items:
            if not isinstance(item, Request):
                continue
            if item.request_id and item.request_id.startswith("raw:"):  # the baseline: raw sends, same bytes
                # Its own (error) reply first: the student posted that receive before the raw ones.
                while waiting:
                    answer_next()
                server.reply(item.student, item.seq, error="raw baseline follows")
                if hasattr(server, "wait_sent"):  # the raw sends go out from here, after every reply
                    server.wait_sent()
                pg, peer = server.data_group(item.student)
                works = [pg.send([raw], peer, TAG_REPLY) for _ in range(int(item.request_id[4:]))]
                for w in works:
                    w.wait()
                sync()
                continue
            into = payload_views(item.student, item.seq) if payload_views is not None else None
            waiting.append((item, engine.submit(score, item, into)))
        if waiting:
            answer_next()
    engine.shutdown()
    server.close()
    if stats_path and reply_s:
        Path(stats_path).write_text(json.dumps({
            "replies": len(reply_s), "reply_us_median": statistics.median(reply_s) * 1e6,
            "reply_us_p90": sorted(reply_s)[int(0.9 * len(reply_s))] * 1e6,
            "requests_per_poll_mean": statistics.mean(batch_sizes)}))


class _Inline:
    """An executor that runs each call at once, on the caller's thread."""

    def submit(self, fn, *args):
        done = Future()
        done.set_result(fn(*args))
        return done

    def shutdown(self):
        pass


def _start_echo(transport: str, preset: str, where: str, stats_path: str = "") -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, __file__, "--role", "echo", "--transport", transport, "--preset", preset,
                             "--where", where, "--stats", stats_path], env=env, cwd=ROOT)


def throughput(transport: str, preset: str) -> dict:
    from kd_teacher.runtime import free_port
    from kd_teacher.transport import RemoteTeacher, RemoteTeacherConfig

    p = PRESETS[preset]
    where = f"bench-{os.getpid()}" if transport == "shm" else f"127.0.0.1:{free_port()}"
    stats_path = tempfile.mkdtemp(prefix="kd_stream_echo_") + "/stats.json" if transport == "dist" else ""
    echo = _start_echo(transport, preset, where, stats_path)
    costs = {}
    try:
        cfg = RemoteTeacherConfig(transport=transport, name=where, address=where, max_in_flight=p["in_flight"],
                                  student_rank=0, num_students=1, connect_timeout_s=300, timeout_s=120,
                                  device=str(_device(0)))
        rt = _connect(echo, lambda: RemoteTeacher(cfg))
        tokens = torch.randint(0, p["vocab"], (p["batch"], p["seq"]))
        values, indices, lse = _payload_tensors(p, _device(0))
        nbytes = sum(t.numel() * t.element_size() for t in (values, indices, lse))
        n = p["messages"]

        def transport_round():
            return _transport_round(rt, tokens, n, p["in_flight"])

        post_s: list = []  # the raw baseline's per-receive posting times
        baseline = _raw_dist(rt, tokens, n, nbytes, post_s) if transport == "dist" else _raw_shm(nbytes, n)
        transport_round()
        baseline()  # warm-up of both
        ours, raw = [], []
        for _ in range(p["rounds"]):
            ours.append(transport_round())
            raw.append(baseline())
        if transport == "dist":
            costs = dist_student_costs(rt, tokens)
            costs["student_floor"] = dist_student_floor(rt, tokens, post_s)
        rt.close()
    finally:
        _stop(echo, transport)
    t_ours, t_raw = statistics.median(ours), statistics.median(raw)
    out = {"transport": transport, "payload_bytes": nbytes, "messages": n, "seconds_transport": ours,
           "seconds_raw": raw, "GBps_transport": nbytes * n / t_ours / 1e9, "GBps_raw": nbytes * n / t_raw / 1e9,
           "ratio_raw_over_transport_time": t_raw / t_ours,
           "baseline": "raw send/recv, same KD group" if transport == "dist" else "raw /dev/shm copy in + out"}
    if costs:
        if Path(stats_path).exists():
            costs["teacher"] = json.loads(Path(stats_path).read_text())
        raw_us = t_raw / n * 1e6
        student_us = costs["student_submit_us"] + costs["student_result_us"]
        costs.update(raw_transfer_us=raw_us, transport_us_per_message=t_ours / n * 1e6,
                     # The student's thread does its per-message work one message after another: it bounds the
                     # ratio, however many requests are in flight. (The teacher's reply_us is its serving
                     # thread's part; the sends themselves go out from a thread of their own.)
                     ratio_bound_by_student_thread=raw_us / max(raw_us, student_us))
        floor = costs["student_floor"]
        floor["ratio_ceiling"] = raw_us / max(raw_us, floor["floor_us"])
        out["cost_breakdown"] = costs
    return out


def _transport_round(rt, tokens, n: int, in_flight: int) -> float:
    """Seconds for n requests of `tokens` through RemoteTeacher `rt`, at most `in_flight` of them out."""
    handles, t0 = [], time.perf_counter()
    for _ in range(n):
        handles.append(rt.submit(tokens))
        if len(handles) >= in_flight:
            rt.result(handles.pop(0))
    for h in handles:
        rt.result(h)
    sync()
    return time.perf_counter() - t0


def dist_student_costs(rt, tokens, n: int = 100) -> dict:
    """The student thread's own time per message (medians): submit, and result() once the reply is in; inside
    them, the reply receive posted and the read of the reply's first block; and the request's send, which
    the client's sending thread does."""
    channel = rt.channel
    parts = {"post_reply_recv_us": [], "request_send_us_on_sender_thread": [], "read_reply_block_us": []}
    originals = channel.pg, channel._sender.pg, channel._block_bytes
    channel.pg = _Timed(channel.pg, "recv", parts["post_reply_recv_us"])
    channel._sender.pg = _Timed(channel._sender.pg, "send", parts["request_send_us_on_sender_thread"])
    channel._block_bytes = _timed(channel._block_bytes, parts["read_reply_block_us"])
    sub, res = [], []
    try:
        for i in range(n + 10):
            t0 = time.perf_counter()
            handle = rt.submit(tokens)
            t1 = time.perf_counter()
            # Until the reply is in, so that result() times its own work, not the wait; spinning, not sleeping:
            # a thread woken from sleep runs its first microseconds on cold caches.
            spin_until = t1 + 1.0
            while channel._posted and not channel._posted[-1].recv.done() and time.perf_counter() < spin_until:
                time.sleep(0)  # lets the other threads have the GIL
            t2 = time.perf_counter()
            rt.result(handle)
            t3 = time.perf_counter()
            if i >= 10:
                sub.append(t1 - t0)
                res.append(t3 - t2)
    finally:
        channel.pg, channel._sender.pg, channel._block_bytes = originals
    out = {"student_submit_us": statistics.median(sub) * 1e6, "student_result_us": statistics.median(res) * 1e6}
    for key, samples in parts.items():
        per_call = statistics.median(samples[-n:]) * 1e6
        out[key] = per_call
    return out


class _Timed:
    """A process group whose `name` calls are timed (the rest passes through)."""

    def __init__(self, pg, name: str, samples: list):
        self._pg, self._name, self._samples = pg, name, samples

    def __getattr__(self, attr):
        value = getattr(self._pg, attr)
        return _timed(value, self._samples) if attr == self._name else value


def _timed(fn, samples: list):
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            samples.append(time.perf_counter() - t0)
    return call


def _connect(proc: subprocess.Popen, make):
    """make() (a RemoteTeacher, which waits for its teacher to connect), failing at once if the teacher
    process has died instead of waiting out the connect timeout."""
    import threading

    box: dict = {}

    def run():
        try:
            box["client"] = make()
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
        if thread.is_alive() and proc.poll() is not None:
            raise RuntimeError(f"the teacher process exited with {proc.returncode} before the student connected")
    if "error" in box:
        raise box["error"]
    return box["client"]


def dist_student_floor(rt, tokens, post_s: list, n: int = 200) -> dict:
    """The least host work a student does per message, each step timed alone in a tight loop (medians), with
    the transport's own code: post the reply's receive (the raw baseline's posts), copy the reply's block to
    the host, decode it, view the payload. Nothing else runs meanwhile, so this is a floor: no per-message
    path that posts one receive and checks the reply's block can take less, whatever threads it uses. Against
    the raw transfer it gives the ratio's ceiling."""
    import types

    from kd_teacher.payload import PayloadHeader, token_hashes
    from kd_teacher.transport import dist_wire as W
    from kd_teacher.transport import protocol as P
    from kd_teacher.transport import reply_block as RB

    channel, info = rt.channel, rt.info
    b, s = tokens.shape
    block, total = W.reply_layout(b, s, info)
    header = PayloadHeader(k=info.k, temperature=info.temperature, vocab_size=info.vocab_size, batch=b, seq_len=s,
                           values_dtype=info.values_dtype, token_hashes=token_hashes(tokens),
                           teacher_fingerprint=info.teacher_fingerprint, recipe_fingerprint=info.recipe_fingerprint)
    buf = torch.zeros(total, dtype=torch.uint8, device=channel.device)
    buf[:block].copy_(torch.frombuffer(RB.encode_ok(7, block, header), dtype=torch.uint8))
    sync()
    head = types.SimpleNamespace(block=block, buf=buf)

    def median_us(fn) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[n // 5:]) * 1e6

    out = {"post_recv_us": statistics.median(post_s) * 1e6 if post_s else float("nan"),
           "read_block_us": median_us(lambda: channel._block_bytes(head)),
           "decode_block_us": median_us(lambda: RB.decode(channel._block_bytes(head), 7, (b, s), info)),
           "view_payload_us": median_us(lambda: P.unpack_payload(buf[block:], header))}
    out["decode_block_us"] -= out["read_block_us"]
    out["floor_us"] = sum(out.values())
    return out


def _raw_dist(rt, tokens, n: int, nbytes: int, post_s: Optional[list] = None):
    """n raw receives of the payload's bytes over the same data group, all posted at once (as our transport
    posts its receives ahead); the echo sends them back to back."""
    from kd_teacher.transport import RequestRejectedError
    from kd_teacher.transport.dist_transport import TAG_REPLY

    channel = rt.channel
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device=channel.device) for _ in range(2)]

    def run():
        t0 = time.perf_counter()
        handle = rt.submit(tokens[:1, :1], request_id=f"raw:{n}")
        works = []
        for i in range(n):
            t_post = time.perf_counter()
            works.append(channel.pg.recv([bufs[i % 2]], channel.teacher_rank, TAG_REPLY))
            post_s.append(time.perf_counter() - t_post) if post_s is not None else None
        for w in works:
            w.wait()
        sync()
        elapsed = time.perf_counter() - t0
        try:
            rt.result(handle)
        except RequestRejectedError:
            pass
        return elapsed

    return run


def shm_in_flight_sweep(preset: str, in_flights=(1, 2, 4, 8)) -> dict:
    """The shm ratio against the same raw copies at several max_in_flight: the reply ring has that many slots,
    so it says how much of the gap is payloads going cold in the cache while they wait in the ring."""
    from kd_teacher.transport import RemoteTeacher, RemoteTeacherConfig

    p = PRESETS[preset]
    where = f"bench-sweep-{os.getpid()}"
    echo = _start_echo("shm", preset, where)
    out = {}
    try:
        tokens = torch.randint(0, p["vocab"], (p["batch"], p["seq"]))
        nbytes = sum(t.numel() * t.element_size() for t in _payload_tensors(p, torch.device("cpu")))
        n = p["messages"]
        baseline = _raw_shm(nbytes, n)
        for in_flight in in_flights:
            rt = RemoteTeacher(RemoteTeacherConfig(transport="shm", name=where, max_in_flight=in_flight,
                                                   student_rank=0, num_students=1, connect_timeout_s=300,
                                                   timeout_s=120))
            ours, raw = [], []
            for _ in range(p["rounds"] + 1):  # the first is a warm-up
                ours.append(_transport_round(rt, tokens, n, in_flight))
                raw.append(baseline())
            rt.close()
            t_ours, t_raw = statistics.median(ours[1:]), statistics.median(raw[1:])
            out[str(in_flight)] = {"us_per_message": t_ours / n * 1e6, "raw_us_per_message": t_raw / n * 1e6,
                                   "ratio_raw_over_transport_time": t_raw / t_ours}
    finally:
        echo.terminate()
        echo.wait(timeout=120)
    return out


def shm_cost_breakdown(preset: str, n: int = 200) -> dict:
    """Microseconds of CPU work per message on each side of the shm transport (medians), measured in one
    process with a one-slot ring (cache-hot, no waiting), next to the two raw copies of the baseline. The
    transport's two processes work in parallel, so raw / max(server, student) bounds the ratio on two idle
    cores; medians, because this machine's other load comes and goes."""
    import threading
    from dataclasses import replace

    from kd_teacher.contract import TeacherContract
    from kd_teacher.payload import PayloadHeader, TopKPayload, token_hashes
    from kd_teacher.transport.shm import ShmClient
    from kd_teacher.transport.shm_server import ShmServer

    p = PRESETS[preset]
    where = f"bench-parts-{os.getpid()}"
    server = ShmServer(where, _info(p))
    box = []
    connect = threading.Thread(target=lambda: box.append(ShmClient(where, 0, TeacherContract(), slots=1,
                                                                   connect_timeout_s=60, heartbeat_timeout_s=60)))
    connect.start()
    while connect.is_alive():
        server.poll(0.01)
    client = box[0]
    values, indices, lse = _payload_tensors(p, torch.device("cpu"))
    header = PayloadHeader(k=p["k"], temperature=1.0, vocab_size=p["vocab"], batch=p["batch"], seq_len=p["seq"],
                           values_dtype=p["dtype"], teacher_fingerprint="bench", recipe_fingerprint="bench")
    tokens = torch.randint(0, p["vocab"], (p["batch"], p["seq"]))
    parts = {key: [] for key in ("student_send", "server_take_request", "server_token_hashes", "server_reply",
                                 "student_receive", "student_check_tokens")}
    try:
        for i in range(n + 20):
            t = [time.perf_counter()]
            client.send(i + 1, tokens, None, None, time.monotonic() + 60)
            t.append(time.perf_counter())
            (req,) = server.poll(60)
            t.append(time.perf_counter())
            h = replace(header, token_hashes=token_hashes(req.tokens))
            t.append(time.perf_counter())
            server.reply(req.student, req.seq, TopKPayload(values, indices, lse, h))
            t.append(time.perf_counter())
            _, payload, _ = client.receive(time.monotonic() + 60)
            t.append(time.perf_counter())
            payload.check_tokens(tokens)
            t.append(time.perf_counter())
            for key, a, b in zip(parts, t, t[1:]):
                parts[key].append(b - a)
    finally:
        client.close()
        server.close()
    us = {key: statistics.median(v[20:]) * 1e6 for key, v in parts.items()}  # the first 20: warm-up
    nbytes = sum(x.numel() * x.element_size() for x in (values, indices, lse))
    raw = _raw_shm(nbytes, 1)
    raw_us = statistics.median(raw() for _ in range(n + 20)) * 1e6
    server_us = us["server_take_request"] + us["server_token_hashes"] + us["server_reply"]
    student_us = us["student_send"] + us["student_receive"] + us["student_check_tokens"]
    return {"us_per_message": us, "server_us": server_us, "student_us": student_us, "raw_copy_in_out_us": raw_us,
            "ratio_bound_two_idle_cores": raw_us / max(server_us, student_us)}


def _raw_shm(nbytes: int, n: int):
    import mmap

    path = Path("/dev/shm") / f"kdt-rawbench-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, nbytes)
    mm = mmap.mmap(fd, nbytes)
    os.close(fd)
    path.unlink()
    shared = torch.frombuffer(mm, dtype=torch.uint8)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)

    def run():
        t0 = time.perf_counter()
        for _ in range(n):
            shared.copy_(src)
            shared.clone()
        return time.perf_counter() - t0

    return run


# ---- (b) overlap: student steps with the hook --------------------------------------------------------------------
def overlap(preset: str, teacher: str, transport: Optional[str] = None) -> dict:
    import kd_step

    from kd_teacher.engine.engine import EngineConfig, TeacherEngine
    from kd_teacher.engine.model import ModelConfig, PrecisionConfig, build_gpt_model
    from kd_teacher.hooks import KDConfig, wrap_forward_step
    from kd_teacher.hooks.sources import InProcessSource, RemoteSource
    from kd_teacher.runtime import init_distributed
    from kd_teacher.runtime import free_port
    from kd_teacher.transport import RemoteTeacher, RemoteTeacherConfig

    sp = PRESETS[preset]
    p = kd_step.PRESETS[preset]
    precision = PrecisionConfig(params_dtype=p["dtype"])
    student_cfg = ModelConfig(**p["student"], precision=precision, seed=1)
    # "large": kd_step's teacher (3x the student's compute); "small": a teacher the size of the student, fast
    # enough to hide behind the student's step when it has a core (CPU) or a GPU of its own.
    teacher_cfg = ModelConfig(**p["teacher" if teacher == "large" else "student"], precision=precision, seed=2)
    transport = transport or sp["step_transport"]
    where = f"bench-step-{teacher}-{os.getpid()}" if transport == "shm" else f"127.0.0.1:{free_port()}"
    # Started first: it builds its teacher while we build ours.
    server, server_log = _start_teacher_server(teacher_cfg, p, transport, where)
    try:
        init_distributed(1, 1, 1234)
        model, optimizer = kd_step.build_student(student_cfg)
        torch.manual_seed(teacher_cfg.seed)
        engine = TeacherEngine(build_gpt_model(teacher_cfg)[0], teacher_cfg.vocab_size,
                               EngineConfig(k=p["k"], max_tokens_per_batch=p["micro_batch_size"] * p["seq"]),
                               model_config=teacher_cfg)
        batches = kd_step.micro_batches(p, student_cfg.vocab_size)
        client = _connect(server, lambda: RemoteTeacher(RemoteTeacherConfig(
            transport=transport, name=where, address=where, student_rank=0, num_students=1, k=p["k"],
            vocab_size=student_cfg.vocab_size, connect_timeout_s=600, timeout_s=300, max_in_flight=4,
            teacher_fingerprint=engine.fingerprint, device=str(_device(0)))))
        kd = dict(k=p["k"], alpha=0.9, vocab_size=student_cfg.vocab_size)
        steps = {
            "ce": kd_step.forward_step,
            "remote": wrap_forward_step(kd_step.forward_step, KDConfig(source="remote", remote={}, prefetch=2, **kd),
                                        model=model, source=RemoteSource(client)),
            "in_process": wrap_forward_step(kd_step.forward_step, KDConfig(source="remote", remote={}, **kd),
                                            model=model, source=InProcessSource(engine)),
        }
        samples = kd_step.time_train_steps(steps, model, optimizer, _SameIterator(batches), p, sp["warmup"],
                                           sp["steps"])
        teacher_s = _teacher_forward_seconds(engine, batches[0]["tokens"])
        client.close()
    except BaseException:
        _stop(server, "shm", server_log)  # whatever it is doing: stop it, and show its log
        raise
    _stop(server, transport, server_log)
    median = {name: statistics.median(v) for name, v in samples.items()}
    student_mb_s = median["ce"] / p["num_microbatches"]
    return {"transport": transport, "teacher": teacher,
            "teacher_params": sum(q.numel() for q in engine.model.parameters()),
            "tokens_per_step": p["micro_batch_size"] * p["seq"] * p["num_microbatches"],
            "teacher_seconds_per_microbatch": teacher_s, "ce_step_seconds_per_microbatch": student_mb_s,
            # The teacher can hide behind the student only if its forward takes well under a student step.
            "teacher_fast_enough": teacher_s < 0.5 * student_mb_s,
            "step_seconds_median": median, "samples": samples,
            "ratio_remote_over_ce": median["remote"] / median["ce"],
            "ratio_remote_over_in_process": median["remote"] / median["in_process"],
            "ratio_in_process_over_ce": median["in_process"] / median["ce"], "target_remote_over_ce": 1.05}


class _SameIterator:
    """The micro-batches as one endless iterator, whichever step asks for `iter()`: Megatron's training loop
    keeps one data iterator across steps, so the hook's read-ahead reaches into the next step."""

    def __init__(self, batches):
        self.iterator = itertools.cycle(batches)

    def __iter__(self):
        return self.iterator


def _teacher_forward_seconds(engine, tokens, reps: int = 5) -> float:
    """The in-process teacher's time for one micro-batch (median), on the student's device."""
    engine.score(tokens)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        engine.score(tokens)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _start_teacher_server(teacher_cfg, p: dict, transport: str, where: str):
    from dataclasses import asdict

    from kd_teacher.runtime import free_port

    cfg = {"model": asdict(teacher_cfg), "engine": {"k": p["k"], "max_tokens_per_batch": p["micro_batch_size"] * p["seq"]},
           "serve": {"transport": transport, "name": where, "address": where,
                     "max_tokens_per_request": p["micro_batch_size"] * p["seq"]}}
    tmp = Path(tempfile.mkdtemp(prefix="kd_stream_"))
    path = tmp / "serve.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    # A one-rank world of its own (not the benchmark's), on the second GPU. LOCAL_RANK picks the device with
    # both GPUs visible: NCCL then uses the direct GPU-to-GPU path, which a process seeing one GPU may not.
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), LOCAL_RANK="1" if torch.cuda.device_count() > 1 else "0")
    log = tmp / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "kd_teacher.cli", "serve", str(path)], env=env, cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, log


def _stop(proc: subprocess.Popen, transport: str, log: Optional[Path] = None) -> None:
    """An shm server runs until told to stop; a dist one ends when its student has said goodbye."""
    if transport == "shm" and proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if log is not None and proc.returncode not in (0, -15):
        print(f"teacher server exited with {proc.returncode}; the end of {log}:\n" + log.read_text()[-4000:],
              file=sys.stderr)


# ---- main -----------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/stream_PRESET.json)")
    parser.add_argument("--role", choices=["main", "echo"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--transport", default="shm", help=argparse.SUPPRESS)
    parser.add_argument("--where", default="", help=argparse.SUPPRESS)
    parser.add_argument("--stats", default="", help=argparse.SUPPRESS)
    parser.add_argument("--skip-overlap", action="store_true", help="only the throughput part")
    parser.add_argument("--teachers", default=None, help="comma list of overlap teachers, small and/or large "
                                                         "(default: the preset's)")
    parser.add_argument("--step-transport", choices=["shm", "dist"], default=None,
                        help="the overlap part's transport (default: the preset's)")
    parser.add_argument("--transports", default=None,
                        help="comma list of throughput transports (default: the preset's); the others' entries and "
                             "the overlap part of an existing --out file are kept")
    args = parser.parse_args()
    torch.set_num_threads(1) if args.preset == "cpu" else None
    if args.role == "echo":
        echo_server(args.transport, args.preset, args.where, args.stats)
        return 0
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    transports = args.transports.split(",") if args.transports else PRESETS[args.preset]["transports"]
    result = {"benchmark": "stream", "preset": args.preset, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
              "load_avg_1m": os.getloadavg()[0],
              "throughput": [dict(throughput(t, args.preset), date=time.strftime("%Y-%m-%d %H:%M"),
                                  load_avg_1m=os.getloadavg()[0]) for t in transports]}
    for r in result["throughput"]:
        if r["transport"] == "shm":
            r["in_flight_sweep"] = shm_in_flight_sweep(args.preset)
            r["cost_breakdown"] = shm_cost_breakdown(args.preset)
    if not args.skip_overlap:
        teachers = args.teachers.split(",") if args.teachers else PRESETS[args.preset]["teachers"]
        result["overlap"] = [overlap(args.preset, teacher, args.step_transport) for teacher in teachers]
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"stream_{args.preset}.json")
    if args.transports and out.exists():  # a partial run: keep what it did not measure
        kept = json.loads(out.read_text())
        result["throughput"] += [r for r in kept.get("throughput", []) if r["transport"] not in transports]
        if "overlap" not in result and "overlap" in kept:
            result["overlap"] = kept["overlap"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["throughput"]:
        print(f"stream {args.preset} {r['transport']}: {r['GBps_transport']:.2f} GB/s vs raw {r['GBps_raw']:.2f} GB/s"
              f" -> ratio {r['ratio_raw_over_transport_time']:.2f} ({r['baseline']})")
        if r.get("cost_breakdown"):  # where the time goes, per message and stage
            print(f"  cost breakdown ({r['transport']}): " + json.dumps(r["cost_breakdown"]))
    for o in result.get("overlap", []):
        print(f"step with remote {o['teacher']} teacher ({o['transport']}): x{o['ratio_remote_over_ce']:.2f} of CE-only, "
              f"x{o['ratio_remote_over_in_process']:.2f} of in-process teacher step "
              f"(in-process x{o['ratio_in_process_over_ce']:.2f} of CE); teacher forward "
              f"{o.get('teacher_seconds_per_microbatch', float('nan')) * 1e3:.1f} ms vs CE step "
              f"{o.get('ce_step_seconds_per_microbatch', float('nan')) * 1e3:.1f} ms per micro-batch")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
