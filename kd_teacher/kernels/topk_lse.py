"""Fused per-shard top-k + log-sum-exp: the launcher of the Triton kernels, or None where they do not apply.

`fused_local_topk_stats` has the signature and the results of the reference
`kd_teacher.topk.local_topk_stats` (values bitwise, ids identical including ties, max bitwise, sum of
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
from typing import Optional

import numpy as np
import torch

from kd_teacher.kernels.triton_support import interpreting, kernels_module


MAX_K = 256
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class TopKKernelConfig:
    """Tuning of the fused kernel (benchmarks/topk_kernel.py sweeps these; docs/teacher_mode.md says what was measured)."""

    chunk: int = 8192  # columns per program of the streaming pass (power of two, >= 512)
    num_warps: int = 8  # warps per program of the streaming pass
    row_num_warps: int = 8  # warps per row of the selection pass when it is a launch of its own
    # The last program of a row to finish streaming selects the row's top k (one launch instead of two;
    # the selection re-reads from L2, and its latency overlaps other programs' streaming).
    fuse_select: bool = True
    # CUDA's expf (as torch.exp) rather than ex2.approx.ftz: the precise one made the streaming pass
    # issue-bound (~20 instructions per logit on sm_90, against ~10); ex2.approx's ~2 ulp per term average
    # out in a sum of ~1e5 terms (tests/gpu/test_topk_kernel.py measures the LSE against float64).
    precise_exp: bool = False
    # Register cap per thread for both launches (0: the compiler's choice). Occupancy decides the speed of
    # both passes: 64 fits 4 programs of 8 warps per multiprocessor (the streaming pass alone takes 55)
    # without spills for k <= 128; the compiler's 80 fits 3. On an H200 a cap (80) took the fused launch
    # from 1.82 to 1.38 ms.
    max_registers: int = 64

    def __post_init__(self):
        if self.chunk < 512 or self.chunk & (self.chunk - 1):
            raise ValueError(f"kernel chunk must be a power of two >= 512, got {self.chunk}")
        if self.max_registers and not 24 <= self.max_registers <= 255:
            raise ValueError(f"kernel max_registers must be 0 or in 24..255, got {self.max_registers}")
        for name in ("num_warps", "row_num_warps"):
            n = getattr(self, name)
            if n not in (1, 2, 4, 8, 16, 32):
                raise ValueError(f"kernel {name} must be a power of two in 1..32, got {n}")


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """Block sizes for one (V_local, k): see topk_lse_triton.py for what each bounds."""

    kk: int  # k' = min(k, V_local), the number of output columns
    kp: int  # power of two >= kk
    group_size: int  # columns per group of the threshold
    gcap: int  # candidate groups a row may re-read (else it is redone exactly)
    cap: int  # candidate elements a row may rank (else it is redone exactly)
    chunk: int
    num_chunks: int
    num_groups: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_for(v_local: int, k: int, config: TopKKernelConfig) -> Optional[KernelPlan]:
    """Block sizes, or None when k is beyond what the kernel serves."""
    kk = min(k, v_local)
    if kk > MAX_K:
        return None
    kp = max(32, _next_pow2(kk))
    # 2 kp candidate groups of group_size columns re-read as one [2 kp, group_size] tile of 8192 elements;
    # smaller groups for larger k keep the tile (registers) and the re-read bytes (~kp * group_size) level.
    group_size = {32: 64, 64: 64, 128: 32, 256: 16}[kp]
    # Narrow shards: keep >= 4 kp groups, or the kk-th group maximum is no bound at all.
    group_size = min(group_size, 1 << max(0, (v_local // (4 * kp)).bit_length() - 1))
    chunk = max(group_size, min(config.chunk, _next_pow2(v_local)))
    return KernelPlan(
        kk=kk, kp=kp, group_size=group_size, gcap=2 * kp, cap=2 * kp, chunk=chunk,
        num_chunks=-(-v_local // chunk), num_groups=-(-v_local // group_size),
    )


def _interpreting() -> bool:
    return interpreting()


def _kernels():
    return kernels_module("topk_lse_triton")


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

    Same contract as `kd_teacher.topk.local_topk_stats`: columns >= `valid` are padding (never counted
    in the max/sum; selected, with id -1, only when fewer than k' columns are valid), k' = min(k, V_local).
    """
    out = launch(logits2d, k, temperature, vocab_start, valid, config)
    return None if out is None else out[:4]


def launch(logits2d, k, temperature, vocab_start, valid, config=None):
    """`fused_local_topk_stats` plus the per-row flags (1 = redone by the exact pass), for benchmarks."""
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
    chunk_max = torch.empty(chunks, dtype=torch.float32, device=dev)
    chunk_sum = torch.empty(chunks, dtype=torch.float32, device=dev)
    group_max = torch.empty(n * plan.num_groups, dtype=torch.float32, device=dev)
    scratch_groups = torch.empty(n * plan.gcap, dtype=torch.int32, device=dev)
    scratch_cols = torch.empty(n * plan.cap, dtype=torch.int32, device=dev)
    flags = torch.empty(n, dtype=torch.int8, device=dev)
    scale, inv_t = _scale_args(float(temperature))
    # Triton's interpreter has neither libdevice nor inline PTX: it runs tl.exp.
    exp_impl = 1 if _interpreting() else (0 if config.precise_exp else 2)
    registers = {"maxnreg": config.max_registers} if config.max_registers and not _interpreting() else {}
    row_stride = logits2d.stride(0)

    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        selection = (out_values, out_ids, out_max, out_sum, plan.num_chunks, plan.num_groups)
        sizes = dict(NC_P2=_next_pow2(plan.num_chunks), NG_P2=_next_pow2(plan.num_groups), GCAP=plan.gcap,
                     CAP=plan.cap)
        arrivals = torch.zeros(n if config.fuse_select else 1, dtype=torch.int32, device=dev)
        kern.chunk_stats_kernel[(chunks,)](
            logits2d, row_stride, v_local, valid, inv_t, vocab_start, plan.kk,
            chunk_max, chunk_sum, group_max, arrivals, scratch_groups, scratch_cols, flags, *selection,
            GROUPS=plan.chunk // plan.group_size, GROUP_SIZE=plan.group_size, SCALE=scale, EXP_IMPL=exp_impl,
            SELECT=config.fuse_select, **sizes, num_warps=config.num_warps, enable_fp_fusion=False, **registers,
        )
        if not config.fuse_select:
            kern.row_topk_kernel[(n,)](
                logits2d, row_stride, v_local, valid, vocab_start, plan.kk,
                chunk_max, chunk_sum, group_max, scratch_groups, scratch_cols, flags, *selection,
                GROUP_SIZE=plan.group_size, CHUNK=plan.chunk, EXP_IMPL=exp_impl, **sizes,
                num_warps=config.row_num_warps, enable_fp_fusion=False, **registers,
            )
        redo_programs = min(_num_programs_for_redo(dev), n)
        per_program = -(-n // redo_programs)
        kern.exact_rows_kernel[(redo_programs,)](
            logits2d, row_stride, v_local, valid, vocab_start, plan.kk, scratch_cols, flags,
            out_values, out_ids, n, per_program,
            CAP=plan.cap, TILE=2048, FLAG_BLOCK=1024, num_warps=config.row_num_warps,
        )
    return out_values, out_ids, out_max, out_sum, flags

