"""A replay student: one process that sends recorded micro-batches to a teacher server and takes the payloads
in, as the KD hook does (`RemoteTeacher.submit` ahead, `result` in order, the payload copied into a buffer the
loss would read). Used by tests/transport/test_serve_many.py and benchmarks/serve_capacity.py.

    python -m kd_teacher.testing.replay_student --transport shm --name NAME --rank 0 --num-students 4 \\
        --requests 60 --seed 1 --out /tmp/student0.pt

The micro-batches are a function of (seed, rank, request index) only (`micro_batches`), so whoever checks the
replies regenerates them. `--mode single` sends one request at a time (submit, wait, submit); `flood` keeps
`--max-in-flight` requests out. `--start N` skips the first N requests (a restarted student goes on where it
was told to). The result file (torch.save) has, per request index, the payload's tensors and hashes, and the
latency of every request in seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch


def micro_batches(seed: int, rank: int, n: int, lengths: list[int], max_batch: int, min_batch: int = 1,
                  vocab_size: int = 1000) -> list[torch.Tensor]:
    """Request i of student `rank`: [b, s] token ids with b in min_batch..max_batch and s one of `lengths`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    out = []
    for _ in range(n):
        b = int(torch.randint(min_batch, max_batch + 1, (1,), generator=g))
        s = lengths[int(torch.randint(0, len(lengths), (1,), generator=g))]
        out.append(torch.randint(1, vocab_size, (b, s), generator=g))
    return out


def sample_ids(rank: int, index: int, rows: int) -> list[int]:
    return [(rank * 1_000_000 + index) * 16 + j for j in range(rows)]


def run(args) -> dict:
    from kd_teacher.transport import RemoteTeacher, RemoteTeacherConfig

    cfg = RemoteTeacherConfig(transport=args.transport, name=args.name, address=args.address,
                              student_rank=args.rank, num_students=args.num_students, k=args.k,
                              vocab_size=args.vocab_size, max_in_flight=args.max_in_flight, timeout_s=args.timeout_s,
                              heartbeat_timeout_s=args.heartbeat_timeout_s, connect_timeout_s=args.connect_timeout_s)
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = micro_batches(args.seed, args.rank, args.requests, lengths, args.max_batch, args.min_batch,
                            args.vocab_size)
    rt = RemoteTeacher(cfg)
    if args.go:  # connected: wait for the others, so that a measured phase starts with every student sending
        with open(f"{args.out}.ready", "w"):
            pass
        while not os.path.exists(args.go):
            time.sleep(0.005)
    started = time.time()
    pin = args.pinned and torch.cuda.is_available()
    buffers: dict = {}  # where the loss would read the payload from: reused per shape, as the hook does
    results, latency, pending = {}, [], []
    t0 = time.perf_counter()

    def take(index: int, handle, sent: float) -> None:
        p = rt.result(handle)
        latency.append(time.perf_counter() - sent)
        key = (tuple(p.values.shape), p.values.dtype)
        if key not in buffers:
            buffers[key] = torch.empty(p.values.shape, dtype=p.values.dtype, pin_memory=pin)
        buffers[key].copy_(p.values)  # consumed: the payload's memory goes back to the transport after this
        if args.keep:
            results[index] = dict(values=p.values.clone(), indices=p.indices.clone(), lse=p.lse.clone(),
                                  hashes=list(p.header.token_hashes), sample_ids=list(p.header.sample_ids or []))
        else:
            results[index] = dict(hashes=list(p.header.token_hashes), sample_ids=list(p.header.sample_ids or []))
        if args.progress:  # replaced whole: a reader never sees it half written
            with open(f"{args.progress}.tmp", "w") as f:
                f.write(str(len(results)))
            os.replace(f"{args.progress}.tmp", args.progress)

    for index in range(args.start, args.requests):
        tokens = batches[index]
        if args.mode == "single":
            sent = time.perf_counter()
            take(index, rt.submit(tokens, sample_ids(args.rank, index, tokens.shape[0])), sent)
            continue
        while len(pending) >= args.max_in_flight:
            take(*pending.pop(0))
        sent = time.perf_counter()
        pending.append((index, rt.submit(tokens, sample_ids(args.rank, index, tokens.shape[0])), sent))
    for item in pending:
        take(*item)
    seconds = time.perf_counter() - t0
    ended = time.time()
    rt.close()
    tokens = sum(int(batches[i].numel()) for i in results)
    return dict(rank=args.rank, results=results, latency_s=latency, seconds=seconds, tokens=tokens,
                started=started, ended=ended)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", choices=["shm", "dist"], default="shm")
    ap.add_argument("--name", default="kd-teacher")
    ap.add_argument("--address", default="127.0.0.1:29600")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--num-students", type=int, required=True)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", default="8,16", help="comma-separated sequence lengths to draw from")
    ap.add_argument("--max-batch", type=int, default=2)
    ap.add_argument("--min-batch", type=int, default=1)
    ap.add_argument("--mode", choices=["flood", "single"], default="flood")
    ap.add_argument("--max-in-flight", type=int, default=4)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--timeout-s", type=float, default=60.0)
    ap.add_argument("--heartbeat-timeout-s", type=float, default=10.0)
    ap.add_argument("--connect-timeout-s", type=float, default=120.0)
    ap.add_argument("--pinned", action="store_true", help="consume payloads into pinned buffers (with CUDA)")
    ap.add_argument("--keep", action="store_true", help="keep every payload's tensors in the result file")
    ap.add_argument("--go", help="after connecting, touch OUT.ready and wait until this file exists")
    ap.add_argument("--progress", help="a file that holds the number of replies taken in so far")
    ap.add_argument("--out", required=True)
    return ap


def main(argv: Optional[list] = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    result = run(args)
    torch.save(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
