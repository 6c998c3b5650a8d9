"""Fused passes of the KD loss's student side: the launcher of `kd_loss_triton`, or None where they do not apply.

`kd_teacher.losses.student` calls `fused_tail_stats` in its forward and `fused_tail_grad` in its backward; a
None answer (no Triton, a CPU tensor outside Triton's interpreter, an unsupported dtype or layout, or the
kernels switched off) sends it down its PyTorch path, which stays the reference. Triton is optional: this module
imports without it, and the kernels are imported on first use.

Results match the PyTorch path to fp32 rounding, not bitwise: the kernels sum the tail online (running max,
rescaled) and in another order. Both are sums of the tail's own terms, so the relative error stays at fp32
rounding whatever the size of the tail.

`KD_TEACHER_FUSED_KD_LOSS=0` in the environment forces the PyTorch path (benchmarks compare the two with it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

import torch

from kd_teacher.kernels.triton_support import interpreting, kernels_module


SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DISABLE_ENV = "KD_TEACHER_FUSED_KD_LOSS"


@dataclasses.dataclass(frozen=True)
class KDLossKernelConfig:
    """Tuning of the fused KD-loss passes; the defaults are the ones benchmarked (benchmarks/kd_loss.py)."""

    words: int = 128  # bitmask words per tile: a tile is words x 32 columns (power of two)
    stats_num_warps: int = 4  # warps per row of the forward pass (H200: 0.84 ms vs 0.90 with 8)
    grad_num_warps: int = 8  # warps per tile of the backward pass
    # CUDA's expf (as torch.exp) or ex2.approx; None: expf for fp32 logits only. ex2.approx(x * log2 e) is off
    # by ~|x| * 1e-7 relative (the rounding of the product): ~20 fp32 ulps of a gradient at x ~ -40, against
    # ~10 for expf, but far below one bf16/fp16 ulp; and expf makes a streaming pass issue-bound on sm_90
    # (see topk_lse.py). In the tail sum the difference stays ~1e-6 relative.
    precise_exp: Optional[bool] = None

    def __post_init__(self):
        if self.words < 1 or self.words & (self.words - 1):
            raise ValueError(f"kd-loss kernel words must be a power of two, got {self.words}")
        for name in ("stats_num_warps", "grad_num_warps"):
            n = getattr(self, name)
            if n not in (1, 2, 4, 8, 16, 32):
                raise ValueError(f"kd-loss kernel {name} must be a power of two in 1..32, got {n}")


DEFAULT_CONFIG = KDLossKernelConfig()


def _interpreting() -> bool:
    return interpreting()


def _kernels():
    return kernels_module("kd_loss_triton")


def kd_loss_kernel_applies(rows: torch.Tensor) -> bool:
    """Whether the fused passes serve `rows` [N, V_local]: CUDA (or CPU under Triton's interpreter), a
    supported dtype, unit column stride, and not switched off by KD_TEACHER_FUSED_KD_LOSS=0."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    if rows.dim() != 2 or rows.dtype not in SUPPORTED_DTYPES or rows.shape[0] == 0:
        return False
    if rows.stride(1) != 1 or rows.shape[1] >= 2**31 - 32:
        return False
    if not (rows.is_cuda or (rows.device.type == "cpu" and _interpreting())):
        return False
    return _kernels() is not None


def device_scope(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def id_bitmask(pos: torch.Tensor, owned: torch.Tensor, v_local: int) -> torch.Tensor:
    """[N, ceil(V_local / 32)] int32: bit (c & 31) of word c >> 5 is set where column c is an owned teacher id."""
    n, k = pos.shape
    words = -(-v_local // 32)
    mask = torch.zeros(n, words, dtype=torch.int32, device=pos.device)
    cols = torch.where(owned, pos, -1).to(torch.int32).contiguous()
    total = n * k
    if total:
        block = 1024
        with device_scope(pos):
            _kernels().id_mask_kernel[(-(-total // block),)](cols, mask, k, words, total, BLOCK=block)
    return mask


def use_precise_exp(config: KDLossKernelConfig, dtype: torch.dtype) -> bool:
    if _interpreting():
        return False  # the interpreter has no libdevice
    return dtype == torch.float32 if config.precise_exp is None else config.precise_exp


def fused_tail_stats(rows, pos, owned, valid: int, inv_t: float, config: Optional[KDLossKernelConfig] = None):
    """(local max of the raw logits [N] fp32, tail sum of exp((z - max) / T) [N] fp32), or None to fall back.

    Same contract as the tail part of `kd_teacher.losses.student._shard_pass`: columns >= `valid` are padding;
    the ids at `pos` where `owned` are left out of the sum (not of the max); a row whose valid columns are all
    -inf has max -inf and sum 0.
    """
    if not kd_loss_kernel_applies(rows):
        return None
    config = config or DEFAULT_CONFIG
    n, v_local = rows.shape
    mask = id_bitmask(pos, owned, v_local)
    out_max = torch.empty(n, dtype=torch.float32, device=rows.device)
    out_sum = torch.empty(n, dtype=torch.float32, device=rows.device)
    tile = config.words * 32
    with device_scope(rows):
        _kernels().tail_stats_kernel[(n,)](
            rows, rows.stride(0), mask, mask.shape[1], valid, float(inv_t), out_max, out_sum, -(-valid // tile),
            WORDS=config.words, PRECISE_EXP=use_precise_exp(config, rows.dtype), num_warps=config.stats_num_warps,
        )
    return out_max, out_sum


def fused_tail_grad(rows, pos, owned, valid: int, inv_t: float, shift: torch.Tensor, scale: torch.Tensor,
                    config: Optional[KDLossKernelConfig] = None):
    """Gradient [N, V_local] in the logits' dtype: exp((z - shift) / T) * scale at valid non-id columns, 0 at
    padding and at the owned ids (the caller adds their own gradient); or None to fall back.

    shift, scale: [N] (or [N, 1]) per row, fp32.
    """
    if not kd_loss_kernel_applies(rows):
        return None
    config = config or DEFAULT_CONFIG
    n, v_local = rows.shape
    mask = id_bitmask(pos, owned, v_local)
    grad = torch.empty(n, v_local, dtype=rows.dtype, device=rows.device)
    shift = shift.reshape(n).to(torch.float32).contiguous()
    scale = scale.reshape(n).to(torch.float32).contiguous()
    tile = config.words * 32
    num_blocks = -(-v_local // tile)
    with device_scope(rows):
        _kernels().tail_grad_kernel[(n * num_blocks,)](
            rows, rows.stride(0), grad, grad.stride(0), mask, mask.shape[1], v_local, valid, float(inv_t),
            shift, scale, num_blocks, WORDS=config.words, PRECISE_EXP=use_precise_exp(config, rows.dtype),
            num_warps=config.grad_num_warps,
        )
    return grad
