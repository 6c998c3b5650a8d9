"""`kd-teacher serve CONFIG`: a teacher server streaming top-k payloads to student ranks.

Launch it like any Megatron-Core job of its own layout (`torchrun --nproc-per-node N -m kd_teacher.cli serve
CONFIG`, or one plain process): TP x PP from the config's `model:`, the rest of the ranks are data-parallel
replicas. The head of each replica (its model-parallel rank 0) talks to the students, over shared memory or
the torch.distributed KD group (`serve.transport`); replica r serves students i with i % replicas == r, so
replicas share the load. A head puts the requests of all its students into one queue (`serve_batching`: a lane
per student, at most `max_in_flight_per_student` each) and takes them out in fair rounds of at most
`engine.max_tokens_per_batch` tokens, once a round's worth is queued or the oldest request has waited
`max_wait_ms`; it hands a round to the other ranks of its model-parallel group, and all of them run one
`engine.score_many`, whose scheduler packs the round into forwards when the serving policy allows repacking
(`engine.repacking`) and runs each request as given otherwise; the head then answers each request. A bad
request gets an error reply and the server goes on; a student that leaves loses its queued requests, and one
that stops taking replies in has them dropped after `student_timeout_s` (shm) without stalling the others.

The config is a teacher config (`model:`, `engine:`, `checkpoint:`) plus a `serve:` block (ServeOptions).
The server runs until SIGTERM/SIGINT or, over torch.distributed, until every student it expects (the ranks
below the students' advisory num_students, and any other rank that joined) has left for good, on every replica
(`DistServer.finished`); students may join and restart until then.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist

from kd_teacher.config import ConfigError, load_config
from kd_teacher.engine.engine import EngineConfig
from kd_teacher.engine.loading import TeacherConfig, build_engine
from kd_teacher.engine.model import ModelConfig
from kd_teacher.engine.scheduler import ScoreRequest
from kd_teacher.serve_batching import StatusLine, StudentQueues
from kd_teacher.transport import protocol as P
from kd_teacher.transport.channel import Endpoint

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    transport: Literal["shm", "dist"] = "shm"
    # shm: the name students connect to (files /dev/shm/kdt-<name>.*)
    name: str = "kd-teacher"
    # dist: the KD rendezvous host:port (the store that replica 0's head hosts; students connect to it)
    address: str = "127.0.0.1:29600"
    backend: Optional[Literal["gloo", "nccl"]] = None
    max_tokens_per_request: int = 16384
    # Requests in one round (one engine.score_many), whatever their tokens; rounds also stop at
    # engine.max_tokens_per_batch tokens.
    max_requests_per_batch: int = 64
    # Requests of one student queued or being scored; the rest wait in its transport (backpressure on it alone).
    max_in_flight_per_student: int = 8
    # The batching window: a round is formed when a full round's tokens are queued or the oldest request has
    # waited this long, whichever comes first (the latency batching may add).
    max_wait_ms: float = 2.0
    # A student that takes no reply in for this long has its queued replies dropped (and logged); over
    # torch.distributed it is dropped as gone (a restart of it joins afresh).
    student_timeout_s: float = 60.0
    # A status line (students, queue depth, tokens/s, batch fill) this often; 0: none.
    status_interval_s: float = 30.0

    def __post_init__(self):
        # Here, not when the first request comes: a server must not start with options it cannot serve by.
        for name in ("max_tokens_per_request", "max_requests_per_batch", "max_in_flight_per_student"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("max_wait_ms", "status_interval_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"serve.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.student_timeout_s > 0:
            raise ConfigError(f"serve.student_timeout_s must be > 0, got {self.student_timeout_s!r}")
    # How long a head waits for requests before it checks for stop (and keeps its model-parallel peers alive).
    poll_interval_s: float = 0.5
    heartbeat_interval_s: float = 0.05
    connect_timeout_s: float = 600.0


@dataclass
class ServeConfig:
    model: ModelConfig
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: Optional[str] = None
    hf_checkpoint: Optional[str] = None
    tokenizer: Optional[str] = None
    # A teacher with no checkpoint has random weights: refused, as `kd-teacher dump` and the in-process source
    # refuse it, unless this says it is meant (trying the server out, tests, benchmarks).
    allow_random_weights: bool = False
    serve: ServeOptions = field(default_factory=ServeOptions)

    def teacher(self) -> TeacherConfig:
        return TeacherConfig(model=self.model, engine=self.engine, checkpoint=self.checkpoint,
                             hf_checkpoint=self.hf_checkpoint, tokenizer=self.tokenizer)


def load_serve_config(path: str, overrides: Optional[list] = None) -> ServeConfig:
    return load_config(ServeConfig, path, overrides)


@dataclass
class ServeStats:
    requests: int = 0
    rejected: int = 0
    batches: int = 0  # rounds: one engine.score_many each
    forwards: int = 0
    tokens: int = 0  # token positions scored (padding not counted)
    dropped: int = 0  # queued requests of students that left
    # student rank -> serve_batching.StudentLatency (rounds and seconds from taken in to replied); heads only
    latency: dict = field(default_factory=dict)


# ---- the loop ---------------------------------------------------------------------------------------------------
def serve(cfg: ServeConfig, stop: Optional[threading.Event] = None, ready: Optional[threading.Event] = None,
          stats: Optional[ServeStats] = None) -> ServeStats:
    """Build the teacher on this process's ranks and serve until `stop` (or all students left). `stats`: counted
    into while serving (a caller that watches the server, as benchmarks/serve_capacity.py does)."""
    from megatron.core import parallel_state as mpu

    from kd_teacher.engine.model import init_model_parallel
    from kd_teacher.engine.moe_policy import require_independent_replicas

    if not cfg.teacher().has_weights and not cfg.allow_random_weights:
        raise ConfigError(
            "kd-teacher serve: checkpoint is not set, so the teacher would have random weights: set checkpoint "
            "(a Megatron-Core distributed checkpoint, or a Megatron-LM --save directory) or hf_checkpoint, or "
            "allow_random_weights: true if a random teacher is meant (trying it out, tests, benchmarks)")
    stop = stop or threading.Event()
    init_model_parallel(cfg.model)
    engine = build_engine(cfg.teacher())
    require_independent_replicas(engine.moe, "kd-teacher serve")
    info = _server_info(cfg, engine, mpu.get_data_parallel_world_size())
    group = mpu.get_model_parallel_group()
    mp_size = dist.get_world_size(group)
    head = dist.get_rank(group) == 0
    endpoint = _endpoint(cfg.serve, info, mpu.get_data_parallel_rank()) if head else None
    if ready is not None:
        ready.set()
    stats = stats if stats is not None else ServeStats()
    queues = StudentQueues(engine.config.max_tokens_per_batch, cfg.serve.max_in_flight_per_student,
                           cfg.serve.max_wait_ms / 1000.0, cfg.serve.max_requests_per_batch)
    status = StatusLine(cfg.serve.status_interval_s, engine.config.max_tokens_per_batch)
    stats.latency = queues.latency
    if head:
        log.info("teacher replica %d: engine.repacking=%s (%s); rounds of <= %d tokens, <= %d in flight per "
                 "student, window %.1f ms", mpu.get_data_parallel_rank(), engine.policy.repacking,
                 engine.policy.reason, engine.config.max_tokens_per_batch, cfg.serve.max_in_flight_per_student,
                 cfg.serve.max_wait_ms)
    # The head's own work (taking requests in, replying) can fail while its model-parallel peers wait for its
    # next command: a failure is shared with them as the command "fail", so that every rank stops.
    failed: Optional[BaseException] = None
    try:
        while True:
            command, requests = "idle", []
            if head:
                try:
                    command, requests = _collect(endpoint, cfg.serve, stop, stats, queues)
                except Exception as e:  # noqa: BLE001 - re-raised below, once the peers know
                    failed = e
                command = "fail" if failed is not None else command
            if mp_size > 1:
                command, requests = _share(command, requests, group)
            if command == "fail":
                if failed is not None:
                    raise failed
                raise RuntimeError("the head of this teacher replica failed (see its log): stopping this rank too")
            if command == "stop":
                break
            if command == "score":
                results = _score(engine, requests, endpoint, group if mp_size > 1 else None)
                _count(engine, requests, stats, status)
                if head:
                    try:
                        _reply(endpoint, requests, results)
                        queues.done(requests)
                        if status.due():
                            log.info("%s", status.line(len(endpoint.connected()), queues))
                    except Exception as e:  # noqa: BLE001 - shared with the peers as the next command
                        failed = e
    finally:
        if endpoint is not None:
            endpoint.close()
    log.info("teacher server done: %d requests, %d rejected, %d rounds, %d forwards, %d tokens, %d dropped (students "
             "that left)", stats.requests, stats.rejected, stats.batches, stats.forwards, stats.tokens, stats.dropped)
    return stats


def _server_info(cfg: ServeConfig, engine, replicas: int) -> P.ServerInfo:
    # One warm-up request: it also tells the dtype the payload values come in.
    warm = engine.score(torch.zeros(1, 1, dtype=torch.long))
    return P.ServerInfo(
        vocab_size=engine.vocab_size, k=engine.config.k, temperature=float(engine.config.temperature),
        values_dtype=warm.header.values_dtype, extraction=warm.header.extraction, teacher_fingerprint=engine.fingerprint,
        recipe_fingerprint=engine.recipe_fingerprint, replicas=replicas,
        max_tokens_per_request=cfg.serve.max_tokens_per_request, max_seq_len=cfg.model.max_sequence_length,
    )


def _endpoint(opts: ServeOptions, info: P.ServerInfo, replica: int) -> Endpoint:
    if opts.transport == "shm":
        from kd_teacher.transport.shm_server import ShmServer

        return ShmServer(opts.name, info, replica, heartbeat_interval_s=opts.heartbeat_interval_s,
                         student_timeout_s=opts.student_timeout_s)
    from kd_teacher.transport.dist_server import DistServer

    return DistServer(opts.address, info, replica, backend=opts.backend, connect_timeout_s=opts.connect_timeout_s,
                      heartbeat_interval_s=opts.heartbeat_interval_s, student_timeout_s=opts.student_timeout_s)


def _count(engine, requests: list, stats: ServeStats, status: StatusLine) -> None:
    plan = engine.scheduler.plan([ScoreRequest(r.tokens) for r in requests])
    tokens = sum(int(r.tokens.numel()) for r in requests)
    stats.batches += 1
    stats.forwards += len(plan)
    stats.tokens += tokens
    status.count(tokens, len(plan), len(requests))


def _collect(endpoint, opts: ServeOptions, stop: threading.Event, stats: ServeStats, queues: StudentQueues):
    """On a head: the next command and the next round of requests (`serve_batching`). Waits for requests up to
    `poll_interval_s` while the queue is empty, and for more of them up to the batching window once it is not;
    bad requests are answered with their error here."""
    if stop.is_set() or (endpoint.finished() and not queues.depth):
        return "stop", []
    give_up = time.monotonic() + opts.poll_interval_s
    while True:
        for req in queues.sync(endpoint.connected()):
            stats.dropped += 1
            endpoint.reply(req.student, req.seq, error="the student left before this request was scored")
        if queues.ready():
            break
        timeout = min(queues.wait_s(), give_up - time.monotonic())
        if timeout <= 0 and not queues.depth:
            break
        for item in endpoint.poll(max(timeout, 0.0), opts.max_requests_per_batch, queues.allowance):
            if isinstance(item, P.Request):
                queues.add(item)
                stats.requests += 1
            else:
                student, seq, error = item
                stats.rejected += 1
                log.info("rejected request %d of student %s: %s", seq, student, error)
                endpoint.reply(student, seq, error=error)
        if queues.ready() or (not queues.depth and time.monotonic() >= give_up) or stop.is_set():
            break
    queues.names.update(endpoint.connected())  # students attached by this poll: their ranks, for the stats
    requests = queues.take() if queues.ready() else []
    if not requests:
        endpoint.flush()
    return ("score" if requests else "idle"), requests


def _score(engine, requests: list, endpoint: Optional[Endpoint] = None, group=None) -> list:
    """Payloads (or error texts) for the requests, in order: one score_many, so the scheduler packs them. On a
    head whose endpoint offers them, the payloads are written straight into its reply buffers. With a
    model-parallel `group`, its ranks agree on the outcome: a batch that failed on any rank is answered with an
    error by the head, and every rank goes on to the next batch together."""
    out = [endpoint.payload_views(r.student, r.seq) for r in requests] if endpoint is not None else None
    error = None
    try:
        results = engine.score_many([ScoreRequest(r.tokens, r.sample_ids, r.request_id) for r in requests], out)
    except Exception as e:  # noqa: BLE001 - a failed batch is answered with its error, the server goes on
        log.exception("scoring a batch of %d requests failed", len(requests))
        error = f"teacher failed on this batch: {type(e).__name__}: {e}"
    if group is not None and not _all_succeeded(error is None, group):
        error = error or "teacher failed on this batch on another rank of its model-parallel group (see its log)"
    return [error] * len(requests) if error is not None else results


def _all_succeeded(ok: bool, group) -> bool:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item()) == 0


def _reply(endpoint: Endpoint, requests: list, results: list) -> None:
    for req, result in zip(requests, results):
        if isinstance(result, str):
            endpoint.reply(req.student, req.seq, error=result)
        else:
            endpoint.reply(req.student, req.seq, result)


def _share(command: str, requests: list, group):
    """Broadcast the head's command and requests to its model-parallel group (framed bytes, no pickle)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    src = dist.get_global_rank(group, 0)
    if dist.get_rank(group) == 0:
        meta = [{"student": r.student, "seq": r.seq, "shape": list(r.tokens.shape), "sample_ids": r.sample_ids,
                 "request_id": r.request_id} for r in requests]
        msg = P.encode({"cmd": command, "requests": meta}, [r.tokens for r in requests])
        size = torch.tensor([len(msg)], dtype=torch.int64, device=device)
        dist.broadcast(size, src, group=group)
        data = torch.frombuffer(bytearray(msg), dtype=torch.uint8).to(device)
        dist.broadcast(data, src, group=group)
        return command, requests
    size = torch.empty(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src, group=group)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src, group=group)
    header, buffers = P.decode(data.cpu().numpy().tobytes(), int(size.item()))
    requests = [P.Request(m["student"], m["seq"], P.tensor_from(buf, P.TOKEN_DTYPE, m["shape"]), m["sample_ids"],
                          m["request_id"]) for m, buf in zip(header["requests"], buffers)]
    return header["cmd"], requests


# ---- CLI --------------------------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a teacher's top-k payloads to student ranks (shm or torch.distributed)")
    p.add_argument("config", help="teacher config YAML with a serve: block (see configs/serve_shm.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.set_defaults(func=_run)


def _run(args) -> int:
    cfg = load_serve_config(args.config, args.overrides)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stats = serve(cfg, stop)
    if dist.get_rank() == 0:
        print(f"served {stats.requests} requests ({stats.rejected} rejected) in {stats.batches} batches")
    return 0
