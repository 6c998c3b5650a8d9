"""Process start-up shared by every command: torch.distributed + Megatron-Core parallel state.

Launched by `torchrun`, the world comes from its environment variables; launched as a plain process, we make
a one-rank world, so that every command runs the same code single-process or distributed. NCCL on CUDA,
gloo on CPU (with the CPU bridges of `kd_teacher.megatron_on_cpu`).
"""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a one-process world's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str | None = None, *, ep: int = 1,
                     etp: int | None = None) -> None:
    """Initialise torch.distributed (if not yet) and Megatron-Core's TP/PP groups; DP is what remains.

    MoE models: `ep` experts-parallel ranks and `etp` tensor-parallel ranks per expert (None: TP), laid out
    by Megatron-Core beside TP/PP (its expert groups need ETP x EP x PP to divide the world)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cuda = torch.cuda.is_available()
    if not cuda:
        from kd_teacher.megatron_on_cpu import enable_megatron_on_cpu

        enable_megatron_on_cpu()
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = backend or ("nccl" if cuda else "gloo")
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)  # torchrun's environment
        else:
            # A one-rank world of our own, passed as arguments: the process environment is the user's (another
            # library, or a torchrun started from this process, must not find our MASTER_PORT there).
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of TP x PP = {tp} x {pp}")
    etp = tp if etp is None else etp
    if world % (etp * ep * pp):
        raise ValueError(f"world size {world} is not a multiple of expert TP x EP x PP = {etp} x {ep} x {pp}")
    if parallel_state.model_parallel_is_initialized():
        _destroy_model_parallel_groups(parallel_state)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    log.debug("rank %d/%d: TP=%d PP=%d DP=%d EP=%d ETP=%d", dist.get_rank(), world, tp, pp, world // (tp * pp),
              ep, etp)


def _destroy_model_parallel_groups(parallel_state) -> None:
    """Megatron-Core's `destroy_model_parallel` only forgets its groups: their gloo threads live on (about 50 a
    layout), and a process that re-initialises many times (a test worker, a notebook) ends with thousands of
    them busy-polling sockets. Destroy the groups this rank belongs to, then forget them."""
    groups = {id(g): g for g in (getattr(parallel_state, "_global_process_group_list", None) or []) if g is not None}
    parallel_state.destroy_model_parallel()
    for group in groups.values():
        try:
            dist.destroy_process_group(group)
        except ValueError:  # already destroyed by its owner (a Megatron-Core version that does it itself)
            pass


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
