"""Fused per-shard top-k + log-sum-exp: the launcher of the Triton kernels, or None where they do not apply.

`fused_local_topk_stats` has the signature and the results of the reference
`kd_teacher.engine.topk.local_topk_stats` (values bitwise, ids identical including ties, max bitwise, sum of
exponentials to fp32 rounding), and returns None when it cannot serve the call (no Triton, a CPU tensor, an
unsupported dtype, k > 256), in which case `vocab_parallel_topk` runs the reference. Triton is optional: this
module imports without it, and the kernels (`topk_lse_triton.py`) are imported on first use.

The kernels read each logit once. Temperature follows what the reference computes on CUDA: torch evaluates
`x / T` for a Python-scalar T as `x * fp32(1 / T)`, and the reference skips the division at T == 1. FMA
contraction is off: fma(x, 1/T, -max) differs from the reference's rounded product minus max, by enough
to turn exp() of a huge logit's residual into inf.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from typing import Optional

import numpy as np
import torch

log = logging.getLogger("kd-teacher.kernels")

MAX_K = 256
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class TopKKernelConfig:
    """Tuning of the fused kernel; the defaults are the ones benchmarked on an H100."""

    chunk: int = 8192  # columns per program of the first pass (power of two, >= 512)
    num_warps: int = 8  # warps per program of the first pass
    merge_num_warps: int = 4  # warps per row of the merge pass
    precise_exp: bool = True  # CUDA's expf (as torch.exp) rather than the faster ex2.approx

    def __post_init__(self):
        if self.chunk < 512 or self.chunk & (self.chunk - 1):
            raise ValueError(f"kernel chunk must be a power of two >= 512, got {self.chunk}")
        for name in ("num_warps", "merge_num_warps"):
            n = getattr(self, name)
            if n not in (1, 2, 4, 8, 16, 32):
                raise ValueError(f"kernel {name} must be a power of two in 1..32, got {n}")


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """Block sizes for one (V_local, k): see topk_lse_triton.py for what each bounds."""

    kk: int  # k' = min(k, V_local), the number of output columns
    kp: int  # sorted candidates kept per chunk (power of two >= kk)
    groups: int  # groups per chunk for the threshold (k-th largest group max)
    group_size: int
    cap: int  # candidate slots per chunk; a chunk with more is redone exactly
    chunk: int
    num_chunks: int
    nc_p2: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_for(v_local: int, k: int, config: TopKKernelConfig) -> Optional[KernelPlan]:
    """Block sizes, or None when k is beyond what the kernel serves."""
    kk = min(k, v_local)
    if kk > MAX_K:
        return None
    kp = max(32, _next_pow2(kk))
    # Twice as many groups as kept keys: the k-th largest of 2k group maxima sits near their median, which
    # leaves ~1.4 k candidates (k=64: mean 90, max 118 of 2000 random chunks), and the scratch of 2 kp int32
    # is exactly the chunk's output row of kp int64.
    groups = max(128, 2 * kp)
    cap = 2 * kp
    # Small shards get a smaller chunk, so that most groups hold real columns and the threshold bites.
    chunk = min(config.chunk, max(groups, 512, _next_pow2(v_local)))
    chunk = max(chunk, groups)
    num_chunks = -(-v_local // chunk)
    return KernelPlan(kk, kp, groups, chunk // groups, cap, chunk, num_chunks, _next_pow2(num_chunks))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _kernels():
    """The Triton kernels module, or None where Triton is not installed."""
    try:
        from kd_teacher.kernels import topk_lse_triton
    except ImportError as e:
        log.debug("fused top-k kernel unavailable: %s", e)
        return None
    return topk_lse_triton


def kernel_available(device: torch.device) -> bool:
    """Whether `fused_local_topk_stats` runs for tensors on `device` (CUDA, or CPU under Triton's interpreter)."""
    if _kernels() is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def _scale_args(temperature: float) -> tuple[bool, float]:
    if temperature == 1.0:
        return False, 1.0
    return True, float(np.float32(1.0) / np.float32(temperature))


def _num_programs_for_redo(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def fused_local_topk_stats(
    logits2d: torch.Tensor,
    k: int,
    temperature: float,
    vocab_start: int,
    valid: int,
    config: Optional[TopKKernelConfig] = None,
):
    """(values [N, k'], ids [N, k'] int64, max of logits/T [N] fp32, sum exp [N] fp32), or None to fall back.

    Same contract as `kd_teacher.engine.topk.local_topk_stats`: columns >= `valid` are padding (never counted
    in the max/sum; selected, with id -1, only when fewer than k' columns are valid), k' = min(k, V_local).
    """
    out = launch(logits2d, k, temperature, vocab_start, valid, config)
    return None if out is None else out[:4]


def launch(logits2d, k, temperature, vocab_start, valid, config=None):
    """`fused_local_topk_stats` plus the per-chunk flags (1 = redone by the exact pass), for benchmarks."""
    config = config or TopKKernelConfig()
    if logits2d.dim() != 2 or not kernel_available(logits2d.device) or logits2d.dtype not in SUPPORTED_DTYPES:
        return None
    n, v_local = logits2d.shape
    plan = plan_for(v_local, k, config)
    if plan is None or v_local >= 2**31 - 1:
        return None
    if not 0 <= valid <= v_local:
        raise ValueError(f"valid columns {valid} outside the shard width {v_local}")
    if logits2d.stride(1) != 1:
        logits2d = logits2d.contiguous()
    kern = _kernels()
    dev = logits2d.device
    out_values = torch.empty(n, plan.kk, dtype=logits2d.dtype, device=dev)
    out_ids = torch.empty(n, plan.kk, dtype=torch.int64, device=dev)
    out_max = torch.empty(n, dtype=torch.float32, device=dev)
    out_sum = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return out_values, out_ids, out_max, out_sum, torch.zeros(0, dtype=torch.int8, device=dev)

    chunks = n * plan.num_chunks
    keys = torch.empty(chunks * plan.kp, dtype=torch.int64, device=dev)
    scratch = keys.view(torch.int32)  # the compaction buffer is the chunk's own output row
    chunk_max = torch.empty(chunks, dtype=torch.float32, device=dev)
    chunk_sum = torch.empty(chunks, dtype=torch.float32, device=dev)
    flags = torch.empty(chunks, dtype=torch.int8, device=dev)
    scale, inv_t = _scale_args(float(temperature))
    row_stride = logits2d.stride(0)

    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        kern.chunk_candidates_kernel[(chunks,)](
            logits2d, row_stride, v_local, valid, plan.kk, inv_t,
            keys, scratch, chunk_max, chunk_sum, flags, plan.num_chunks,
            GROUPS=plan.groups, GROUP_SIZE=plan.group_size,
            KP=plan.kp, CAP=plan.cap, SCALE=scale, PRECISE_EXP=config.precise_exp and not _interpreting(),
            num_warps=config.num_warps, enable_fp_fusion=False,
        )
        redo_programs = min(_num_programs_for_redo(dev), chunks)
        per_program = -(-chunks // redo_programs)
        kern.exact_chunks_kernel[(redo_programs,)](
            logits2d, row_stride, v_local, valid, plan.kk, keys, scratch, flags, chunks, per_program,
            plan.num_chunks, GROUPS=plan.groups, GROUP_SIZE=plan.group_size, KP=plan.kp, CAP=plan.cap,
            FLAG_BLOCK=1024, num_warps=config.num_warps,
        )
        kern.merge_rows_kernel[(n,)](
            logits2d, row_stride, valid, vocab_start, plan.kk, keys, chunk_max, chunk_sum,
            out_values, out_ids, out_max, out_sum, plan.num_chunks,
            NC_P2=plan.nc_p2, KP=plan.kp, CHUNK=plan.chunk,
            PRECISE_EXP=config.precise_exp and not _interpreting(), num_warps=config.merge_num_warps,
            enable_fp_fusion=False,
        )
    return out_values, out_ids, out_max, out_sum, flags

