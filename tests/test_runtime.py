"""Process start-up (`kd_teacher.runtime`): a plain process gets a one-rank world without its environment being
rewritten (issue 25 item 8: init_distributed used to write RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT into it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

_CHILD = f"""
import json, os
import torch.distributed as dist
from kd_teacher.runtime import init_distributed
init_distributed()
print(json.dumps({{"world": dist.get_world_size(), "rank": dist.get_rank(),
                  "set": [k for k in {_KEYS!r} if k in os.environ]}}))
"""


def test_one_rank_world_leaves_the_process_environment_alone():
    env = {k: v for k, v in os.environ.items() if k not in _KEYS}
    run = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"world": 1, "rank": 0, "set": []}


def _threads_after_reinitialising(times: int) -> tuple[int, int]:
    from kd_teacher.runtime import init_distributed

    init_distributed(tp=2)  # threads that belong to the process, not to one layout, start here
    before = len(os.listdir("/proc/self/task"))
    for _ in range(times):
        init_distributed(tp=2)
    return before, len(os.listdir("/proc/self/task"))


def test_reinitialising_parallel_state_does_not_leak_gloo_threads():
    # A test worker re-initialises Megatron-Core's groups for every job; each layout's gloo groups start about
    # 50 native threads, and leaked ones busy-poll their sockets (a full suite ended with >1000 per worker).
    from kd_teacher.testing.distributed import run_distributed

    before, after = run_distributed(_threads_after_reinitialising, 2, 10, tp=2)[0]
    assert after - before < 40, f"{after - before} threads more after 10 re-initialisations"
