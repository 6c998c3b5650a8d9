"""Run a function in N real torch.distributed processes with Megatron-Core's parallel groups.

`run_distributed(fn, world_size, tp=2)` spawns (or reuses) N worker processes that share one gloo world,
initialises `megatron.core.parallel_state` with the requested TP/PP layout, calls `fn(*args)` on every rank
and returns the list of per-rank results. A failure on any rank raises here with that rank's traceback.

Workers are kept alive between calls (one pool per world size): importing Megatron-Core costs ~6 s per
process on a CI core, and a test suite with dozens of multi-rank tests would otherwise spend most of its time
importing. Every call re-initialises the model-parallel groups, so no state leaks from one call's layout into
the next; a call that fails or times out tears the pool down so the next call starts clean.
"""

from __future__ import annotations

import atexit
import os
import queue
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch.multiprocessing as mp

from kd_teacher.runtime import free_port

DEFAULT_TIMEOUT_S = 240.0


@dataclass
class _Job:
    fn: Callable
    args: tuple
    kwargs: dict
    tp: int
    pp: int
    seed: int
    ep: int = 1
    etp: int | None = None


def _worker(rank: int, world_size: int, port: int, jobs, results, stacks_path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import faulthandler

    # A job that hangs is reported with every thread's Python stack (the parent asks with SIGUSR1 on
    # timeout): a file, because the worker's stderr belongs to whichever test was capturing when it spawned.
    faulthandler.register(signal.SIGUSR1, file=open(stacks_path, "w"), all_threads=True)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from kd_teacher.megatron_on_cpu import enable_megatron_on_cpu
    from kd_teacher.runtime import init_distributed

    enable_megatron_on_cpu()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    while True:
        job = jobs.get()
        if job is None:
            break
        try:
            init_distributed(job.tp, job.pp, job.seed, ep=job.ep, etp=job.etp)
            out = job.fn(*job.args, **job.kwargs)
            results.put((rank, True, out))
        except BaseException:  # noqa: BLE001 - reported to the parent verbatim
            results.put((rank, False, traceback.format_exc()))
    # No destroy_process_group(): it can wait on peers that are already gone, and the process is ending.
    # A normal return (not os._exit) lets multiprocessing's exit handlers shut down the Manager process
    # that Megatron's checkpoint writer starts inside the worker; os._exit left it running as an orphan.


class _Pool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = free_port()
        self.stacks = [tempfile.mktemp(prefix=f"kdt-pool{world_size}-rank{r}-", suffix=".txt")
                       for r in range(world_size)]
        self.procs = [
            # Not daemonic: Megatron's checkpoint writer starts a multiprocessing Manager, and daemonic
            # processes may not have children. shutdown_pools (registered atexit) stops them instead.
            ctx.Process(target=_worker, args=(r, world_size, port, self.jobs[r], self.results, self.stacks[r]),
                        daemon=False)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, job: _Job, timeout: float) -> list:
        for q in self.jobs:
            q.put(job)
        out: list = [None] * self.world_size
        errors = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                raise TimeoutError(
                    f"distributed job {getattr(job.fn, '__name__', job.fn)} did not finish in {timeout:.0f} s"
                    + (f"; dead ranks: {dead}" if dead else "") + self._stacks()
                ) from None
            if ok:
                out[rank] = value
            else:
                errors.append((rank, value))
        if errors:
            rank, tb = sorted(errors)[0]
            raise RuntimeError(f"rank {rank} of {self.world_size} failed:\n{tb}")
        return out

    def _stacks(self) -> str:
        """Every live worker's thread stacks, to say where a job hangs."""
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGUSR1)
        time.sleep(2.0)
        text = []
        for r, path in enumerate(self.stacks):
            try:
                with open(path) as f:
                    text.append(f"\n--- rank {r} stacks ---\n{f.read()[-6000:]}")
            except OSError:
                pass
        return "".join(text)

    def close(self) -> None:
        for q in self.jobs:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + 3.0
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=1.0)
        for path in self.stacks:
            try:
                os.unlink(path)
            except OSError:
                pass


_POOLS: dict[int, _Pool] = {}


def run_distributed(
    fn: Callable,
    world_size: int,
    *args,
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    timeout: float = DEFAULT_TIMEOUT_S,
    ep: int = 1,
    etp: int | None = None,
    **kwargs,
) -> list:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks with Megatron TP=`tp`, PP=`pp` (and, for MoE models,
    EP=`ep`, expert TP=`etp`, None: TP); per-rank results.

    `fn` must be importable by name (a module-level function), since workers are spawned processes.
    """
    if world_size % (tp * pp):
        raise ValueError(f"world_size {world_size} is not a multiple of tp*pp = {tp * pp}")
    pool = _POOLS.get(world_size)
    if pool is None or not all(p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close()
        pool = _POOLS[world_size] = _Pool(world_size)
    try:
        return pool.run(_Job(fn, args, kwargs, tp, pp, seed, ep, etp), timeout)
    except BaseException:
        pool.close()
        _POOLS.pop(world_size, None)
        raise


def shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


atexit.register(shutdown_pools)
